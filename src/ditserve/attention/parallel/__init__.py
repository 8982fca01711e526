"""Sequence-parallel attention: one sequence split across the ranks of a torch.distributed group.

A model whose sequence is split hands each attention call its local slice of q/k/v and a
`SequenceSplit` (built once per forward by `split_dense` / `split_packed`, like the metadata);
a wrapper around any attention backend does the communication and returns the local slice of
the output, exactly what one GPU would have computed for those tokens:

- `UlyssesAttention`: all-to-all from "my tokens, all heads" to "all tokens, my heads", the
  backend on the whole sequence, all-to-all back. Any backend; needs heads divisible by P.
- `RingAttention`: queries stay, K/V chunks go round the ring, partial outputs merged by
  their log-sum-exp. Any head count; needs a backend that returns the log-sum-exp.
- `HybridAttention`: Ulysses inside each group of U ranks, ring between the R groups
  (`HybridSplit`); heads divisible by U, a backend that returns the log-sum-exp.

A model holds one `SequenceParallel` (which of the three, over which groups) and asks it for
each forward's split, each layer's wrapper and the gathered output.

Decisions, shared by both:
- Uneven lengths: each sample is cut into P chunks of ceil(L / P) tokens, the last padded;
  padded keys are never attended (dropped through metadata/row plans, the model unchanged)
  and padded output rows are zero. Packed batches split every sample across all ranks.
- Joint tokens (Flux's text) are held whole on every rank and go in front of each
  sample's tokens (`forward_joint`); their queries are computed once (Ulysses: a head slice
  per rank; ring: against one rank's chunk each) and combined so that every rank returns the
  same full joint output, bit for bit. Key-only joint tokens (Cosmos3's prompt K/V, computed
  once in `prepare`; a step runs no text query) go in front of each sample's keys only
  (`forward_joint_keys`): Ulysses takes its heads of them with q and kv lengths of their own,
  ring attends them as one more chunk.
- The inner backend is chosen on group rank 0 and broadcast (`agree_on_choice`), once per call
  shape, so ranks never run different kernels.
- Non-causal attention without dense masks (what DiTs use); causal or `attn_mask` calls go
  to the plain `Attention`. Cross-attention to replicated context (Wan's text) needs no
  wrapper: its queries are local and its keys whole.
"""

from ditserve.attention.parallel.agreement import AgreedBackends, agree_on_choice, lse_backend_names
from ditserve.attention.parallel.hybrid import HybridAttention, HybridSplit, hybrid_split
from ditserve.attention.parallel.partials import merge_partials
from ditserve.attention.parallel.plan import SequenceParallel, as_sequence_parallel
from ditserve.attention.parallel.ring import RingAttention
from ditserve.attention.parallel.split import SequenceSplit, split_dense, split_packed
from ditserve.attention.parallel.ulysses import UlyssesAttention, kv_head_replication

__all__ = [
    "AgreedBackends",
    "HybridAttention",
    "HybridSplit",
    "RingAttention",
    "SequenceParallel",
    "SequenceSplit",
    "UlyssesAttention",
    "agree_on_choice",
    "as_sequence_parallel",
    "hybrid_split",
    "kv_head_replication",
    "lse_backend_names",
    "merge_partials",
    "split_dense",
    "split_packed",
]
