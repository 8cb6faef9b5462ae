"""The teachers of a run, one module per kind of question:

- `local.py`: a local teacher model, attached to the trainer (loading, shared vocabulary, DeepSpeed preparation);
- `remote.py`: a teacher behind an HTTP server (vLLM's `/v1/completions`, or `horizon_opd.teacher_server`): the client;
- `routing.py`: which teachers a run has (`plan_teachers`, `load_teachers`, `attach`) and which one scores each row.
"""

from .local import attach_teacher, load_teacher, register_student_head_for_zero3, vocab_slice
from .remote import RemoteTeacher, TeacherScores, TeacherServerError, attach_teacher_server, connect_teacher_server
from .routing import (
    Teacher,
    attach,
    check_teacher_column,
    check_teachers,
    has_server,
    load_teachers,
    plan_teachers,
    teacher_indices,
)

__all__ = [
    "RemoteTeacher",
    "Teacher",
    "TeacherScores",
    "TeacherServerError",
    "attach",
    "attach_teacher",
    "attach_teacher_server",
    "check_teacher_column",
    "check_teachers",
    "connect_teacher_server",
    "has_server",
    "load_teacher",
    "load_teachers",
    "plan_teachers",
    "register_student_head_for_zero3",
    "teacher_indices",
    "vocab_slice",
]
