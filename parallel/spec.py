"""The model's parallel facts, stated once: a table keyed by module-path patterns.

Each row says, for the modules whose qualified name (in the unparallelised `Qwen35LM`) matches
`pattern` (fnmatch: `*` also crosses dots) and whose class is `kind` (None: any):

- `tp`: its tensor-parallel role, one of TP_ROLES (parallel/tensor_parallel.py turns each role into
  a torch ParallelStyle; parallel/comm_model.py reads the parameter placements it implies);
- `params`: for the `heads` role, each parameter's placement: `shard0` (split by head), `kv`
  (split by KV head, or replicated with one head kept per rank when tp exceeds the KV heads) or
  `shared` (replicated value applied to every head: its gradient is summed over the tp group);
- `ep`: `experts` for the routed experts: every parameter split by expert (dim 0) over the ep
  ranks, and the enclosing MoE block's token dispatcher swapped for the all-to-all one;
- `fsdp`: `unit` (its own FSDP2 unit over the data-parallel mesh) or `expert_unit` (its own unit
  over the expert-data-parallel mesh under EP; inside its layer's unit otherwise); everything else
  belongs to the root unit;
- `stage`: for a top-level module, the pipeline stages that hold it: `first`, `last`, `layers`
  (the decoder stack, cut between stages) or `every` (buffers each stage needs);
- `fp8`: `never` (not a GEMM the FP8 backends swap: a lookup, the fp32 router, a convolution),
  `sensitive` (a GEMM kept in BF16 by default: precision.exclude starts from these patterns) or
  None (eligible, subject to precision.include / keep_first_n / keep_last_n);
- `cp`: what a module exchanges over the context-parallel group (model/context_parallel.py):
  `kv_gather` (all-gathers its K and V), `state_passing` (the conv halo and the state summaries of
  Gated DeltaNet), `loss_shares` (the MoE balancing loss's expert counts); parallel/comm_model.py
  counts the CP collectives from these rows;
- `swap`: what the plan changes at run time besides placements (a class, a head count, a
  dispatcher), so the order of those changes is written down with `parallelize`.

The first matching row decides each field (rows are checked in order, a row may set only some
fields). Adding a top-level module (a new head) is one row here plus its use in the model's forward.
No torch import: the config schema reads the FP8 defaults before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

# column: output features split (weight Shard(0)); row: input features split (Shard(1)), output
# reduce-scattered to the sequence shard; row_replicate: the same, all-reduced to the full
# sequence; heads: DTensor storage, local compute on this rank's heads (parallel/local_params.py);
# sequence: a norm on this rank's sequence slice; vocab_embed / vocab_head: split by vocabulary;
# gather_input: a dense MLP taking the sequence-sharded stream; moe_input: an MoE block running
# the gathered sequence and keeping its own slice of the output; replicated_input: the shared
# expert, on the gathered sequence.
TP_ROLES = ("column", "row", "row_replicate", "heads", "sequence", "vocab_embed", "vocab_head",
            "gather_input", "moe_input", "replicated_input")
HEAD_PARAMS = ("shard0", "kv", "shared")
EP_ROLES = ("experts",)
FSDP_ROLES = ("unit", "expert_unit")
STAGES = ("first", "layers", "last", "every")
FP8_ROLES = ("never", "sensitive")
CP_ROLES = ("kv_gather", "state_passing", "loss_shares")


@dataclass(frozen=True)
class ModuleSpec:
    pattern: str
    kind: Optional[str] = None
    tp: Optional[str] = None
    params: dict = field(default_factory=dict)
    ep: Optional[str] = None
    fsdp: Optional[str] = None
    stage: Optional[str] = None
    fp8: Optional[str] = None
    cp: Optional[str] = None
    swap: str = ""

    def matches(self, name: str, module=None) -> bool:
        """`module`: the module named `name` (its class or a base class must be `kind`)."""
        if not fnmatchcase(name, self.pattern):
            return False
        return self.kind is None or any(c.__name__ == self.kind for c in type(module).__mro__)


_GDN_HEADS = {**{f"in_proj_{p}.weight": "shard0" for p in "qkvzba"},
              **{f"conv_{p}.weight": "shard0" for p in "qkv"},
              "A_log": "shard0", "dt_bias": "shard0", "norm.weight": "shared"}
_ATTN_HEADS = {"q_proj.weight": "shard0", "k_proj.weight": "kv", "v_proj.weight": "kv",
               "q_norm.weight": "shared", "k_norm.weight": "shared"}

QWEN35_SPEC: tuple[ModuleSpec, ...] = (
    # Top level, in pipeline order.
    ModuleSpec("embed_tokens", tp="vocab_embed", stage="first", fp8="never"),
    ModuleSpec("visual", fsdp="unit", stage="first",
               swap="parallel.vision: the encoder's class gains the balanced plan's forward"),
    ModuleSpec("layers", stage="layers"),
    ModuleSpec("norm", stage="last"),
    ModuleSpec("lm_head", tp="vocab_head", stage="last", fp8="sensitive",
               swap="tp: re-tied to embed_tokens when the weights are tied"),
    ModuleSpec("mtp", stage="last"),
    ModuleSpec("token_ce", stage="last", swap="tp: VocabParallelCrossEntropy"),
    ModuleSpec("rotary", stage="every"),
    # The vision tower: one FSDP unit, its own plan (parallel/vision_plan.py), not TP-split.
    ModuleSpec("visual.patch_embed*", fp8="sensitive"),
    ModuleSpec("visual.merger*", fp8="sensitive"),
    ModuleSpec("visual.pos_embed", fp8="never"),
    # Decoder layers (also the one inside each MTP block) and MTP blocks: FSDP units.
    ModuleSpec("layers.*", kind="DecoderLayer", fsdp="unit"),
    ModuleSpec("mtp.*", kind="MTPBlock", fsdp="unit"),
    ModuleSpec("mtp.*.fc", fp8="sensitive"),
    ModuleSpec("layers.*.input_layernorm", tp="sequence"),
    ModuleSpec("layers.*.post_attention_layernorm", tp="sequence"),
    ModuleSpec("layers.*.self_attn", tp="heads", params=_ATTN_HEADS,
               swap="tp: num_heads, num_kv_heads (and kv_heads) per rank"),
    ModuleSpec("layers.*.self_attn.o_proj", tp="row"),
    ModuleSpec("layers.*.linear_attn", tp="heads", params=_GDN_HEADS,
               swap="tp: head counts and key/value dims per rank"),
    ModuleSpec("layers.*.linear_attn.out_proj", tp="row"),
    ModuleSpec("*.in_proj_a", fp8="sensitive"),
    ModuleSpec("*.in_proj_b", fp8="sensitive"),
    ModuleSpec("layers.*.mlp", kind="SwiGLU", tp="gather_input"),
    ModuleSpec("layers.*.mlp.gate_proj", tp="column"),
    ModuleSpec("layers.*.mlp.up_proj", tp="column"),
    ModuleSpec("layers.*.mlp.down_proj", tp="row"),
    ModuleSpec("layers.*.mlp", kind="SparseMoE", tp="moe_input"),
    ModuleSpec("layers.*.mlp.shared_expert", tp="replicated_input"),
    ModuleSpec("layers.*.mlp.shared_expert.gate_proj", tp="column"),
    ModuleSpec("layers.*.mlp.shared_expert.up_proj", tp="column"),
    ModuleSpec("layers.*.mlp.shared_expert.down_proj", tp="row_replicate"),
    # Routed experts: split by EP (not TP), their own FSDP unit over the expert-dp ranks.
    ModuleSpec("*experts", kind="GroupedExperts", ep="experts", fsdp="expert_unit",
               swap="ep: the MoE block's token dispatcher becomes the all-to-all one"),
    ModuleSpec("*.mlp.gate", fp8="never"),
    ModuleSpec("*.shared_expert_gate", fp8="sensitive"),
    ModuleSpec("*.conv*", fp8="sensitive"),
    ModuleSpec("*norm*", fp8="sensitive"),
    # Context parallelism: the mixers (decoder and MTP layers) and the MoE blocks.
    ModuleSpec("*.self_attn", kind="GatedAttention", cp="kv_gather"),
    ModuleSpec("*.linear_attn", kind="GatedDeltaNet", cp="state_passing"),
    ModuleSpec("*.mlp", kind="SparseMoE", cp="loss_shares"),
)


def lookup(spec: tuple[ModuleSpec, ...], name: str, module, attr: str):
    """The first non-empty `attr` of the rows matching `module` named `name`, else None. A row's
    kind matches subclasses too: the FP8 backends swap modules for subclasses of their class."""
    for row in spec:
        value = getattr(row, attr)
        if value and row.matches(name, module):
            return value
    return None


def tp_role(name: str, module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Optional[str]:
    return lookup(spec, name, module, "tp")


def ep_role(name: str, module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Optional[str]:
    return lookup(spec, name, module, "ep")


def fsdp_role(name: str, module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Optional[str]:
    return lookup(spec, name, module, "fsdp")


def stage_role(name: str, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Optional[str]:
    """The pipeline stages holding top-level module `name` (None: not a stage's part)."""
    return lookup(spec, name, None, "stage")


def top_level_stages(spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> list[tuple[str, str]]:
    """(name, stage role) of every top-level module the spec names, in pipeline order."""
    return [(r.pattern, r.stage) for r in spec
            if r.stage is not None and "." not in r.pattern and "*" not in r.pattern]


def cp_modules(model, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> dict[str, list[str]]:
    """{cp role: names of the modules of `model` (meta will do) that hold it}, in model order."""
    out: dict[str, list[str]] = {role: [] for role in CP_ROLES}
    for name, m in model.named_modules():
        role = lookup(spec, name, m, "cp") if name else None
        if role is not None:
            out[role].append(name)
    return out


def fp8_role(name: str, module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Optional[str]:
    return lookup(spec, name, module, "fp8")


def fp8_sensitive_patterns(spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> list[str]:
    """The patterns kept in BF16 by default (precision.exclude's default)."""
    return [row.pattern for row in spec if row.fp8 == "sensitive"]


def param_placement(param: str, owner_role: Optional[str], params: dict, tp: int,
                    num_kv_heads: int) -> Optional[str]:
    """`shard0`, `shard1` or `replicate` for a parameter under tensor parallelism of size tp > 1,
    None for a plain (not TP-distributed) one. param: its name inside the module holding the TP
    role `owner_role` (for `heads`: inside the mixer, with `params` the mixer's row)."""
    if owner_role == "heads":
        rule = params.get(param)
        if rule == "kv":
            return "shard0" if tp <= num_kv_heads else "replicate"
        return {"shard0": "shard0", "shared": "replicate", None: None}[rule]
    if owner_role in ("column", "vocab_embed", "vocab_head") and param == "weight":
        return "shard0"
    if owner_role in ("row", "row_replicate") and param == "weight":
        return "shard1"
    if owner_role == "sequence" and param == "weight":
        return "replicate"
    return None


def head_params(name: str, module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> dict:
    """The per-parameter rules of the `heads` row matching `module` ({} for other modules)."""
    return next((r.params for r in spec if r.tp == "heads" and r.matches(name, module)), {})


def tp_placements(model, tp: int, num_kv_heads: int,
                  spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> dict[str, str]:
    """{parameter name: shard0 | shard1 | replicate} of the parameters tensor parallelism of size
    tp distributes in `model` (an unparallelised nn.Module tree, meta will do)."""
    out = {}
    for mname, m in model.named_modules():
        role = tp_role(mname, m, spec)
        if role is None:
            continue
        params = head_params(mname, m, spec)
        for pname, _ in m.named_parameters(recurse=role == "heads"):
            placement = param_placement(pname, role, params, tp, num_kv_heads)
            if placement is not None:
                out[f"{mname}.{pname}"] = placement
    return out


def validate(spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> None:
    """Raise ValueError for a row naming an unknown role."""
    for row in spec:
        for attr, allowed in (("tp", TP_ROLES), ("ep", EP_ROLES), ("fsdp", FSDP_ROLES), ("stage", STAGES),
                              ("fp8", FP8_ROLES), ("cp", CP_ROLES)):
            value = getattr(row, attr)
            if value is not None and value not in allowed:
                raise ValueError(f"parallel.spec row {row.pattern!r}: {attr}={value!r} is not one "
                                 f"of {allowed}")
        for p, rule in row.params.items():
            if rule not in HEAD_PARAMS:
                raise ValueError(f"parallel.spec row {row.pattern!r}: {p}={rule!r} is not one of "
                                 f"{HEAD_PARAMS}")


validate()
