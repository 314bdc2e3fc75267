"""Which modules become FSDP units: the one size-based algorithm and the one transformer-class rule.

Three callers need the same answer: FSDP1 (torch's `size_based_auto_wrap_policy` does the wrapping
there, and this module mirrors it exactly), FSDP2 (which has no auto-wrap, so `fully_shard` is called
on the modules chosen here), and the memory / communication estimate (models.wrap_units), which has
no nn.Module at all, only a shape. So the algorithm works on a small tree of `Node`s: built from a
real module by `module_tree`, or from a model shape by models.py. Pure Python: no torch import.

Size-based, as torch's `_recursive_wrap` walks with `size_based_auto_wrap_policy`: depth first,
children before their parent; a module becomes a unit when the parameters of its subtree not already
inside a unit below it reach `min_num_params`. ModuleList / ModuleDict never become units (they have
no forward of their own) and nn.MultiheadAttention is neither entered nor wrapped (its forward reads
its weights directly). The root is not chosen here: it is always the last unit (FSDP wraps it, FSDP2's
`fully_shard(model)`), holding whatever no unit below took.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEVER_UNITS = ("ModuleList", "ModuleDict")  # torch: size_based_auto_wrap_policy.EXCLUDE_WRAP_MODULES
LEAVES = ("MultiheadAttention",)  # torch: size_based_auto_wrap_policy.FORCE_LEAF_MODULES


@dataclass
class Node:
    """One module: its dotted path ('' for the root), class name, parameters of its whole subtree
    (each shared tensor once), and its child modules in registration order."""

    path: str
    cls: str
    total: int
    children: list["Node"] = field(default_factory=list)


def size_units(root: Node, min_num_params: int) -> list[tuple[str, int]]:
    """Units below the root as (path, parameters the unit itself gathers), in the order FSDP wraps
    them (a child before its parent); the root's own share is `root.total - sum of the top units`."""
    out: list[tuple[str, int, int]] = []  # path, own share, subtree total

    def visit(node: Node) -> int:
        """Parameters of `node`'s subtree that ended up inside units (node included)."""
        if node.cls in LEAVES:
            return 0  # torch neither enters nor wraps a forced leaf
        taken_below = sum(visit(c) for c in node.children)
        rest = node.total - taken_below
        if node is not root and rest >= min_num_params and node.cls not in NEVER_UNITS:
            out.append((node.path, rest, node.total))
            return node.total
        return taken_below

    visit(root)
    return [(p, own) for p, own, _ in out]


def class_units(root: Node, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
    """Every module of one of `class_names` (transformer_auto_wrap_policy's rule), nested ones too,
    as (path, own share), in module (forward registration) order."""
    found: list[Node] = []

    def visit(node: Node) -> None:
        if node is not root and node.cls in class_names:
            found.append(node)
        for c in node.children:
            visit(c)

    visit(root)
    paths = {n.path for n in found}
    inside: dict[str, int] = {}
    for n in found:  # a unit's own share excludes units nested in it
        parent = _nearest_ancestor(n.path, paths)
        if parent is not None:
            inside[parent] = inside.get(parent, 0) + n.total
    return [(n.path, n.total - inside.get(n.path, 0)) for n in found]


def _nearest_ancestor(path: str, paths: set[str]) -> str | None:
    """The longest of `paths` that `path` lies under (`path` starts with it and a dot), or None. Each
    dotted prefix is looked up, instead of every path tested (a shape's estimate builds this for every
    block: quadratic in the layers, most of a new shape's arithmetic before)."""
    parts = path.split(".")
    for k in range(len(parts) - 1, 0, -1):
        q = ".".join(parts[:k])
        if q in paths:
            return q
    return None


def units(root: Node, policy: str, min_num_params: int, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
    """All units, root last, as (path, own share): policy 'transformer', 'size' or 'none'."""
    below = {"transformer": lambda: class_units(root, class_names),
             "size": lambda: size_units(root, min_num_params),
             "none": lambda: []}[policy]()
    paths = {p for p, _ in below}
    top = [p for p, _ in below if _nearest_ancestor(p, paths) is None]
    totals = _totals(root)
    return below + [("", root.total - sum(totals[p] for p in top))]


def _totals(root: Node) -> dict[str, int]:
    out: dict[str, int] = {}

    def visit(node: Node) -> None:
        out[node.path] = node.total
        for c in node.children:
            visit(c)

    visit(root)
    return out


def module_tree(module, path: str = "") -> Node:
    """The Node tree of a torch nn.Module (parameters counted as `module.parameters()` does)."""
    children = [module_tree(c, f"{path}.{name}" if path else name) for name, c in module.named_children()]
    total = sum(p.numel() for p in module.parameters())
    return Node(path, type(module).__name__, total, children)


def _leaf(path: str, cls: str, n: int) -> Node:
    return Node(path, cls, n)


def _parent(path: str, cls: str, children: list[Node]) -> Node:
    return Node(path, cls, sum(c.total for c in children), children)


def spec_tree(spec) -> Node:
    """The Node tree of shardlab's GPT (run/gpt.py) for a shape, built from the shape alone (no torch),
    or for a bare count with known units: a root holding `wrap_unit_count` units of one class."""
    if spec.is_bare:
        n, u, c = spec.params, spec.wrap_unit_params or 0, spec.wrap_unit_count or 0
        kids = [_leaf(f"units.{i}", "Block", u) for i in range(c)] if u else []
        rest = n - u * c if u else n
        return _parent("", "Model", [_parent("units", "ModuleList", kids), _leaf("rest", "Rest", max(rest, 0))])
    d, f, kv, V, gpt = spec.hidden, spec.ffn, spec.kv_dim, spec.vocab, spec.family == "gpt"
    norm = ("LayerNorm", 2 * d) if gpt else ("RMSNorm", d)  # (class, parameters)

    def lin(i: int, o: int) -> int:  # nn.Linear(i, o): biases in gpt only
        return i * o + (o if gpt else 0)

    def block(p: str) -> Node:
        attn = _parent(f"{p}.attn", "Attention", [_leaf(f"{p}.attn.qkv", "Linear", lin(d, d + 2 * kv)),
                                                   _leaf(f"{p}.attn.proj", "Linear", lin(d, d))])
        mlp_kids = ([_leaf(f"{p}.mlp.fc", "Linear", lin(d, f)), _leaf(f"{p}.mlp.out", "Linear", lin(f, d))] if gpt else
                    [_leaf(f"{p}.mlp.{n}", "Linear", d * f) for n in ("gate", "up", "down")])
        return _parent(p, "Block", [_leaf(f"{p}.norm1", norm[0], norm[1]), attn, _leaf(f"{p}.norm2", norm[0], norm[1]),
                                    _parent(f"{p}.mlp", "MLP", mlp_kids)])

    kids = [_leaf("tok_emb", "Embedding", V * d)] + ([_leaf("pos_emb", "Embedding", spec.seq_len * d)] if gpt else [])
    kids += [_parent("blocks", "ModuleList", [block(f"blocks.{i}") for i in range(spec.layers)]),
             _leaf("norm", norm[0], norm[1]), _leaf("lm_head", "Linear", V * d)]
    return _parent("", "GPT", kids)
