"""Transformation heads: map each gallery model's embeddings into the shared search space.

Two modes:
- ``to-query`` (the paper's model-to-model mode): one head T_i per gallery model, trained with
  G_i and the query model Q frozen, minimising ||norm(T_i(G_i(x))) - Q(x)||^2. The space is the
  query model's own; its ``space_id`` is Q's fingerprint.
- ``unified``: a small query head T_q on frozen Q and the heads T_i are trained jointly into a
  shared space: L2 between the normalised transformed embeddings of the same image, plus
  classification of both sides through one shared cosine classifier. Its ``space_id`` is minted
  from the gallery-side heads and the classifier, so a later query head T_q' trained against
  them (a query-model update) keeps the space and the gallery is not touched.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gallery_builder.models.checkpoint import (
    CheckpointError,
    build_checked,
    fingerprint,
    read_config,
    read_weights,
    save_checkpoint,
)
from gallery_builder.training.fit import check_settings, fit
from gallery_builder.training.fusion import average_in_view, fuse

__all__ = [
    "MODES",
    "DEFAULT_MODE",
    "QUERY_MEMBER",
    "Head",
    "HeadSet",
    "HeadSettings",
    "OPEN_SET_HEADS",
    "head_settings",
    "train_heads",
    "train_query_head",
    "save_heads",
    "load_heads",
    "check_compatible",
    "check_query_model",
    "check_gallery_models",
]

MODES = ("unified", "to-query")
DEFAULT_MODE = "unified"
#: The member name of the query model's own embedding of a gallery image (the identity
#: member: no head in ``to-query`` mode, the query head in ``unified`` mode).
QUERY_MEMBER = "query"


class Head(nn.Module):
    """Forward-Compatible-Training-style MLP: in -> [hidden, BN, ReLU] x layers -> out."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        d = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            d = hidden
        blocks.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


@dataclass
class HeadSettings:
    """Head training; the defaults are the Fashion-MNIST demo's (256 wide trained as well as
    512 wide at a fifth of the time). The experiment's open-set default
    (:data:`OPEN_SET_HEADS`) differs."""

    epochs: int | None = 10
    steps: int = 2000
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    hidden: int = 256
    layers: int = 2
    temperature: float = 0.05
    l2_weight: float = 1.0
    seed: int = 0
    warmup: ClassVar[float] = 0.1
    spare_steps: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_settings(self)


class HeadSet(nn.Module):
    """The heads of one space: a head per gallery model, and in ``unified`` mode the query head
    and the shared classifier. ``meta`` keeps names, dims and fingerprints of what they join."""

    def __init__(
        self,
        mode: str,
        dim: int,
        gallery_dims: dict[str, int],
        query_dim: int,
        num_classes: int,
        hidden: int = 512,
        layers: int = 2,
        identity: bool = False,
        weights: dict[str, float] | None = None,
        neighbours: dict | None = None,
    ) -> None:
        """``identity`` adds the query model's own embedding of each gallery image as one more
        member (:data:`QUERY_MEMBER`); ``weights`` are the members' fusion weights (equal when
        None; a member may have weight 0); ``neighbours`` (see :meth:`set_neighbours`) averages
        each gallery vector over its neighbours in the gallery models' view."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if QUERY_MEMBER in gallery_dims:
            raise ValueError(f"{QUERY_MEMBER!r} names the query model's member; rename the model")
        if mode == "to-query" and dim != query_dim:
            raise ValueError(f"to-query heads map into the query space: dim {dim} != {query_dim}")
        self.mode, self.dim, self.query_dim = mode, dim, query_dim
        self.gallery_dims = dict(gallery_dims)
        keys = [_key(n) for n in gallery_dims]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"gallery model names {sorted(gallery_dims)} collide once '.' "
                "becomes '_'; rename one of them"
            )
        self.num_classes, self.hidden, self.layers = num_classes, hidden, layers
        self.gallery = nn.ModuleDict(
            {_key(n): Head(d, dim, hidden, layers) for n, d in gallery_dims.items()}
        )
        self.query = Head(query_dim, dim, hidden, layers) if mode == "unified" else None
        if self.query is not None and layers == 0 and dim == query_dim:
            _start_as_identity(self.query)
        self.classifier = (
            nn.Parameter(torch.randn(num_classes, dim) * 0.01) if mode == "unified" else None
        )
        self.identity = identity
        self.weights: dict[str, float] = {}
        self.set_weights(weights)
        self.neighbours: dict | None = None
        self.set_neighbours(neighbours)

    @property
    def names(self) -> list[str]:
        """The gallery models, each with its head."""
        return list(self.gallery_dims)

    @property
    def members(self) -> list[str]:
        """What a gallery vector fuses: the gallery models, and the query model's own
        embedding when ``identity``."""
        return self.names + [QUERY_MEMBER] * self.identity

    @property
    def fused(self) -> list[str]:
        """The members with a positive fusion weight: what a gallery vector is built from (a
        member of weight 0 adds nothing, so its model need not run)."""
        return [n for n in self.members if self.weights[n] > 0]

    @property
    def inputs(self) -> list[str]:
        """The members whose raw embeddings a gallery vector needs: the fused ones and those
        whose view finds the neighbours."""
        graph = self.neighbours["graph"] if self.neighbours else {}
        return [n for n in self.members if n in self.fused or graph.get(n, 0) > 0]

    def set_neighbours(self, neighbours: dict | None) -> None:
        """Average each fused gallery vector with its ``k`` nearest gallery neighbours, found
        in the gallery models' raw embeddings (cosine, mean over ``graph``'s models at their
        weights) and weighted by their similarity to the power ``alpha``
        (:func:`~gallery_builder.training.fusion.neighbour_average`); None: no averaging."""
        if neighbours is None:
            self.neighbours = None
            return
        try:
            k, alpha, graph = int(neighbours["k"]), float(neighbours["alpha"]), neighbours["graph"]
            graph = {str(n): float(w) for n, w in graph.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"neighbours need k, alpha and graph weights, got {neighbours}") from e
        if k < 1 or not alpha >= 0:
            raise ValueError(f"neighbours: k must be >= 1 and alpha >= 0, got {k} and {alpha}")
        if not set(graph) <= set(self.names) or any(not w >= 0 for w in graph.values()):
            raise ValueError(f"neighbours: graph weights over {self.names}, got {graph}")
        if not sum(graph.values()) > 0:
            raise ValueError(f"neighbours: graph weights need a positive sum, got {graph}")
        self.neighbours = {"k": k, "alpha": alpha, "graph": graph}

    def member_dim(self, name: str) -> int:
        return self.query_dim if name == QUERY_MEMBER else self.gallery_dims[name]

    def set_weights(self, weights: dict[str, float] | None) -> None:
        """Fusion weights per member (equal when None); unknown or missing members are errors."""
        weights = dict.fromkeys(self.members, 1.0) if weights is None else dict(weights)
        if set(weights) != set(self.members):
            raise ValueError(f"weights for {sorted(weights)}, members are {sorted(self.members)}")
        if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        self.weights = {n: float(weights[n]) for n in self.members}

    def transform_gallery(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        if name == QUERY_MEMBER and self.identity:
            return self.transform_query(raw)
        return self.gallery[_key(name)](raw)

    def transform_query(self, query_embedding: torch.Tensor) -> torch.Tensor:
        if self.query is None:
            return F.normalize(query_embedding, dim=-1)
        return self.query(query_embedding)

    @torch.no_grad()
    def encode_gallery(
        self,
        raw: dict[str, torch.Tensor],
        names: list[str] | None = None,
        weights: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery vectors and uncertainties from raw per-member embeddings (eval mode): the
        ``names`` members (default :attr:`fused`), fused with ``weights`` (default the set's
        own)."""
        self.eval()
        names = names or self.fused
        weights = weights or self.weights
        w = torch.tensor([weights[n] for n in names])
        if not float(w.sum()) > 0:
            w = torch.ones(len(names))
        return fuse(torch.stack([self.transform_gallery(n, raw[n].float()) for n in names]), w)

    @torch.no_grad()
    def gallery_vectors(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors and uncertainties of a whole gallery: :meth:`encode_gallery`, then, with
        :attr:`neighbours` set, each vector averaged over its neighbours among these items. The
        uncertainty is the spread of the members that shape a vector: the fused ones and the
        graph's, each at its weight."""
        if not (neighbours := self.neighbours):
            return self.encode_gallery(raw)
        graph = neighbours["graph"]
        shaping = {n: max(self.weights[n], graph.get(n, 0.0)) for n in self.members}
        names = [n for n in self.members if shaping[n] > 0]
        _, uncertainty = self.encode_gallery(raw, names, shaping)
        vectors, _ = self.encode_gallery(raw)
        return average_in_view(vectors, raw, neighbours), uncertainty

    @torch.no_grad()
    def encode_query(self, query_embedding: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.transform_query(query_embedding.float())

    def gallery_state(self) -> dict[str, torch.Tensor]:
        """Weights that define the gallery side of the space (heads + classifier)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("query.")}

    def space_id(self, query_fingerprint: str) -> str:
        if self.mode == "to-query":
            return query_fingerprint
        return "unified-" + fingerprint(self.gallery_state(), {"dim": self.dim})

    def head_fingerprint(self, name: str) -> str:
        prefix = "query." if name == QUERY_MEMBER else f"gallery.{_key(name)}."
        return fingerprint(
            {k: v for k, v in self.state_dict().items() if k.startswith(prefix)},
            {"in": self.member_dim(name), "out": self.dim},
        )


#: Heads for classes no model was trained on: linear (``layers=0``) heads matched or beat
#: 2-layer MLP heads (glyphs, to-query mode: fused Recall@1 88.3 vs 86.9) at a fraction of the
#: time, and a small ``l2_weight`` lets the shared classifier shape the unified space (glyphs:
#: fused Recall@1 / MAP@R 91.6 / 58.5 at 0.1, 90.6 / 57.2 at 1.0, 90.1 / 54.9 at 4.0). A step
#: budget, not epochs: ten epochs were 810 steps on han (10k images, 3 views each), where the
#: fused vector gained until about 3,000 (unified, seed 0: 97.53 / 78.90 at 810 steps, 97.86 /
#: 79.75 at 1,620, 98.00 / 80.41 at 3,240, 98.08 / 80.60 at 4,860); glyphs (20k images) had
#: 1,550 and gained a little more (92.59 / 61.83, 92.71 / 62.15 at 3,100).
OPEN_SET_HEADS = HeadSettings(epochs=None, steps=3000, layers=0, l2_weight=0.1)

#: The weight of a new query head's pull onto the stored gallery vectors, against the frozen
#: classifier's cross-entropy at 1 (update study, seed 0, new query Recall@1 against the old
#: gallery: han 95.54 / 95.89 / 96.06 / 95.80 at 0.1 / 1 / 4 / 16, glyphs 90.47 / 91.14 /
#: 91.36 / 91.36; fitted to the gallery heads' outputs alone at 0.1, as before: han 95.48).
UPDATE_L2_WEIGHT = 4.0


def _start_as_identity(head: Head) -> None:
    """A linear query head as wide as the space starts as the identity: the identity member
    then starts as the query model alone, and training moves it only where the classifier and
    the gallery heads pull (glyphs, seed 0: unified:query Recall@1 / MAP@R 93.81 / 62.50 from
    a random start, 94.11 / 62.71 from the identity; the query model alone 94.02 / 62.42)."""
    (linear,) = head.net
    nn.init.eye_(linear.weight)
    nn.init.zeros_(linear.bias)


def _key(name: str) -> str:
    return name.replace(".", "_")


def _cosine_logits(x: torch.Tensor, classifier: torch.Tensor, temperature: float):
    return x @ F.normalize(classifier, dim=-1).T / temperature


def train_heads(
    mode: str,
    gallery_raw: dict[str, torch.Tensor],
    query_embedding: torch.Tensor,
    labels: torch.Tensor,
    s: HeadSettings | None = None,
    dim: int | None = None,
    identity: bool = False,
) -> HeadSet:
    """Train the heads of one space on embeddings of the same training images.

    ``gallery_raw[name]`` holds G_name's embeddings (N, d_name); ``query_embedding`` is Q's
    (N, d_q); in ``unified`` mode ``labels`` (N,) feed the shared classifier. ``identity``
    makes the query model's own embedding of a gallery image one more member (it needs no
    head of its own).
    """
    s = s or HeadSettings()
    torch.manual_seed(s.seed)
    n = len(query_embedding)
    for name, raw in gallery_raw.items():
        if len(raw) != n:
            raise ValueError(f"{name}: {len(raw)} gallery embeddings for {n} query embeddings")
    labels = torch.as_tensor(labels, dtype=torch.long)
    q = F.normalize(query_embedding.float(), dim=-1)
    raw = {k: v.float() for k, v in gallery_raw.items()}
    heads = HeadSet(
        mode,
        dim or q.shape[1],
        {k: v.shape[1] for k, v in raw.items()},
        q.shape[1],
        int(labels.max()) + 1,
        s.hidden,
        s.layers,
        identity,
    )
    if mode == "to-query":
        for name in heads.names:
            head = heads.gallery[_key(name)]
            fit(
                head.parameters(),
                n,
                s,
                lambda idx, _gen, head=head, name=name: (
                    (head(raw[name][idx]) - q[idx]).pow(2).sum(1).mean()
                ),
                f"head {name} -> query",
                [head],
            )
        return heads.eval()

    def unified_loss(idx, _gen):
        tq = heads.query(q[idx])
        y = labels[idx]
        loss = F.cross_entropy(_cosine_logits(tq, heads.classifier, s.temperature), y)
        for name in heads.names:
            tg = heads.gallery[_key(name)](raw[name][idx])
            loss = loss + (
                s.l2_weight * (tg - tq).pow(2).sum(1).mean()
                + F.cross_entropy(_cosine_logits(tg, heads.classifier, s.temperature), y)
            ) / len(heads.names)
        return loss

    fit(heads.parameters(), n, s, unified_loss, "unified heads", [heads])
    return heads.eval()


def train_query_head(
    heads: HeadSet,
    member_raw: dict[str, torch.Tensor],
    new_query_embedding: torch.Tensor,
    labels: torch.Tensor,
    s: HeadSettings | None = None,
) -> HeadSet:
    """Compatible query-model update in ``unified`` mode: a new query head T_q' for a new query
    model, trained against the frozen gallery side. No gallery model runs (the stored raw
    training embeddings are used) and the gallery's space is unchanged.

    ``member_raw`` holds the raw training embeddings of every fused member, the query model's
    own (:data:`QUERY_MEMBER`, the model the current query head follows) among them when it is
    fused: T_q' learns to land on each training image's gallery vector as the gallery stores it
    (the fused mean, weights included), with the frozen classifier keeping the classes apart.
    """
    if heads.mode != "unified":
        raise ValueError(
            "a new query head needs unified heads; in to-query mode train new "
            "gallery heads into the new query space (train_heads) and re-project"
        )
    missing = [n for n in heads.fused if n not in member_raw]
    if missing:
        raise ValueError(f"no training embeddings of the fused members {missing}")
    s = s or HeadSettings()
    torch.manual_seed(s.seed)
    new = copy.deepcopy(heads).eval()
    for p in new.parameters():
        p.requires_grad_(False)
    targets, _ = heads.encode_gallery(member_raw)
    new.query = Head(new_query_embedding.shape[1], heads.dim, heads.hidden, heads.layers)
    new.query_dim = new_query_embedding.shape[1]
    q = F.normalize(new_query_embedding.float(), dim=-1)
    labels = torch.as_tensor(labels, dtype=torch.long)

    def loss_fn(idx, _gen):
        tq = new.query(q[idx])
        l2 = (targets[idx] - tq).pow(2).sum(-1).mean()
        ce = F.cross_entropy(_cosine_logits(tq, new.classifier, s.temperature), labels[idx])
        return UPDATE_L2_WEIGHT * l2 + ce

    fit(new.query.parameters(), len(q), s, loss_fn, "new query head", [new.query])
    for p in new.parameters():
        p.requires_grad_(True)
    return new.eval()


def save_heads(
    path: Path,
    heads: HeadSet,
    query_fingerprint: str,
    gallery_fingerprints: dict[str, str],
    settings: HeadSettings,
    training: dict,
) -> dict:
    """Write a heads checkpoint folder; records the space and what the heads join."""
    config = {
        "kind": "heads",
        "identity": {
            "mode": heads.mode,
            "dim": heads.dim,
            "query_dim": heads.query_dim,
            "gallery_dims": heads.gallery_dims,
            "num_classes": heads.num_classes,
            "hidden": heads.hidden,
            "layers": heads.layers,
            "identity": heads.identity,
            "weights": heads.weights,
            "neighbours": heads.neighbours,
        },
        "space_id": heads.space_id(query_fingerprint),
        "query_fingerprint": query_fingerprint,
        "gallery_models": [
            {
                "name": n,
                "fingerprint": query_fingerprint if n == QUERY_MEMBER else gallery_fingerprints[n],
                "head_fingerprint": heads.head_fingerprint(n),
            }
            for n in heads.members
        ],
        "settings": asdict(settings),
        "training": training,
    }
    return save_checkpoint(path, heads.state_dict(), config)


def load_heads(path: Path) -> tuple[HeadSet, dict]:
    path = Path(path)
    config = read_config(path, "heads")
    state = read_weights(path, config)
    try:
        heads = build_checked(lambda: HeadSet(**config["identity"]), state, path)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build heads from its config: {e}") from e
    return heads.eval(), config


def head_settings(config: dict, path: Path) -> HeadSettings:
    """The settings a heads checkpoint (``config``, read from ``path``) was trained with."""
    try:
        return HeadSettings(**config["settings"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the heads' training settings: {e}") from e


def check_compatible(
    heads_config: dict, query_config: dict, gallery_configs: dict[str, dict]
) -> None:
    """Raise a clear error when heads do not belong to these query and gallery models."""
    check_query_model(heads_config, query_config)
    check_gallery_models(heads_config, gallery_configs)


def check_query_model(heads_config: dict, query_config: dict) -> None:
    """Raise a clear error when heads do not belong to this query model."""
    ident = heads_config["identity"]
    if query_config["embedding_dim"] != ident["query_dim"]:
        raise CheckpointError(
            f"heads expect a {ident['query_dim']}-dim query model, the query model "
            f"({query_config['fingerprint']}) gives {query_config['embedding_dim']}"
        )
    if heads_config["query_fingerprint"] != query_config["fingerprint"]:
        raise CheckpointError(
            f"heads belong to query model {heads_config['query_fingerprint']} (space "
            f"{heads_config['space_id']}), not to query model {query_config['fingerprint']}"
        )


def check_gallery_models(heads_config: dict, gallery_configs: dict[str, dict]) -> None:
    """Raise a clear error when heads do not take these gallery models' embeddings."""
    ident = heads_config["identity"]
    known = {g["name"]: g for g in heads_config["gallery_models"]}
    for name, cfg in gallery_configs.items():
        if name not in known:
            raise CheckpointError(
                f"heads have no head for gallery model {name!r}; they have {sorted(known)}"
            )
        want = ident["query_dim"] if name == QUERY_MEMBER else ident["gallery_dims"][name]
        if cfg["embedding_dim"] != want:
            raise CheckpointError(
                f"head {name!r} takes {want}-dim input, gallery model "
                f"{name!r} ({cfg['fingerprint']}) gives {cfg['embedding_dim']}"
            )
        if known[name]["fingerprint"] != cfg["fingerprint"]:
            raise CheckpointError(
                f"head {name!r} was trained for gallery model {known[name]['fingerprint']}, "
                f"given {cfg['fingerprint']}"
            )
