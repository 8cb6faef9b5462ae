"""Diagnostics of rolling's gap to OPD at equal steps (issue 35, item 3): runs, not options for users.

A rolled chunk differs from the same positions of an OPD rollout in two ways, and either could cost quality:
- **off-policy contexts**: the context (prompt + the rollout's earlier chunks) was sampled by the weights of earlier
  steps. `ResampledContextTrainer` resamples each continuing slot's context from the current student at every step
  (as many tokens as it held, EOS suppressed, as a rollout still in flight has none) before its chunk is generated
  and trained: on-policy contexts at rolling's depth mix, paying the decode of the whole context again.
- **truncated backprop**: the context is encoded without grad, so the loss trains the weights only through the
  chunk's own positions. That one became an option once it closed the gap (`rolling_context_grad`, `+grad`).

`horizon-opd` and `python -m horizon_opd.demo.mismatch` run them as `<rolling method>+resample` and `+grad`
(`compare.method`), beside the rolling method and OPD, at the same steps.
"""

from ..trainer import HorizonOPDTrainer


class ResampledContextTrainer(HorizonOPDTrainer):
    """Rolling whose continuing contexts are resampled from the current student at every step."""

    def _tokenize_prompts(self, prompts: list):
        tokenized = super()._tokenize_prompts(prompts)
        if not self._rolls():
            return tokenized
        pool, step = self.rolling.pool, self.state.global_step
        rolled = [i for i, slot in enumerate(pool.slots) if slot.depth > 0]
        if not rolled:
            return tokenized
        depths = [pool.slots[i].depth for i in rolled]
        suppressed = self.generation_config.suppress_tokens
        self.generation_config.suppress_tokens = list(self.eos_token_ids)  # a context in flight holds no EOS
        self._set_generation_limit(max(depths))
        try:
            resampled = super(HorizonOPDTrainer, self)._generate_single_turn(
                [pool.slots[i].prompt_ids for i in rolled], None, {})
        finally:
            self.generation_config.suppress_tokens = suppressed
        meter = self._meters["train"]
        meter.add_generation(resampled)  # the diagnostic's extra decode is part of its cost
        meter.count("prefill_tokens", sum(len(pool.slots[i].prompt_ids) for i in rolled))
        for i, ids, depth in zip(rolled, resampled, depths, strict=True):
            slot = pool.slots[i]
            slot.generated = list(ids)[:depth]
            slot.written_at = [step] * len(slot.written_at)
        return [slot.prompt_ids + slot.generated for slot in pool.slots], None, {}
