"""The recorded file's name and columns (shared by the recorder and the loaders)."""

from __future__ import annotations

#: File name of a run's recording, in the run's folder.
RECORDING = "gradient_weights.parquet"
#: The columns of a recording (besides one ``w_<method>`` per compared method), as documented in
#: the file's metadata.
COLUMNS: dict[str, str] = {
    "step": "0-based index of the optimiser step whose mini-batch held the token",
    "epoch": "training epoch (one RL iteration: one rollout)",
    "batch_idx": "mini-batch index within the epoch (0: the first step on fresh rollouts)",
    "sequence": "row of the token's sequence in its mini-batch",
    "position": "column of the token in the mini-batch's (B, L-1) log-prob grid",
    "advantage": "advantage A of the token",
    "ratio": "importance-sampling ratio r = pi / pi_old, as the loss computed it",
    "logp": "log pi (current policy, before the step)",
    "old_logp": "log pi_old (behaviour policy)",
    "prob": "pi = exp(logp)",
    "old_prob": "pi_old = exp(old_logp)",
    "entropy": "policy entropy at the token's position (NaN if not returned)",
    "region": "IN, LN, LP, HN or HP of the trained loss (its clip_low/clip_high, of what it clips)",
    "prob_weight": "W on grad(pi) the trained loss applied (NaN if it states none)",
    "grad_weight": "g = W * pi on grad(log pi) the trained loss applied",
}
#: Prefix of the columns holding every compared method's weight W on the same token.
METHOD_PREFIX = "w_"
