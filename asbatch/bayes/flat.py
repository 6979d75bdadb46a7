"""The flat posterior of one model: every Bayesian weight's mu, log sigma and eps live in one buffer each.

Why: on a GPU a small network's training step is bound by how many kernels the host launches, and sampling,
perturbing and summing the posterior layer by layer was most of them (an AS step of ResNet20: ~6,500 ops,
80 % per-weight bookkeeping). Here one model forward draws eps with one `randn` and builds
w = mu + sigma * eps for all layers in two ops; each layer's weight is a view of that w (its backward is one
`cat`), and the AS ascent and the KL are a few ops on the flat tensors. The conv and linear weights come first
in the flat layout (`FlatLayout`), so under autocast one cast serves all of them.

`make_bayesian` gives each layer a `GaussianWeight` parametrization, then `FlatPosterior.adopt` takes their
tensors: mu and log sigma become two flat Parameters of the model itself, `flat_mu` and `flat_log_sigma`
(what the optimizer, DDP and autograd see; not a child module, which nn.Sequential would call), and
`module.parametrizations.<name>.original` and `GaussianWeight.log_sigma` become views of them (computed on
access, so `.to()`, `deepcopy` and in-place writes under no_grad all stay consistent). The state_dict keeps
the per-layer keys only, so checkpoints and fine-tune files have the layout they always had.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from asbatch.bayes.gaussian import GaussianWeight

ATTRIBUTE = "_flat_posterior"  # where a Bayesian model keeps its FlatPosterior (a plain attribute)
MU, LOG_SIGMA = "flat_mu", "flat_log_sigma"  # the model's two flat Parameters
_FULL = (torch.float32, torch.float64)  # the KL is computed in at least fp32
_CAST = (nn.Conv2d, nn.Linear)  # layers whose weights autocast casts (placed first in the flat layout)


class FlatPosterior:
    """The flat posterior of `model`: mu and log sigma of all its Bayesian weights as two flat Parameters
    (registered on the model), eps as one flat tensor.

    `weights` lists (module, name, GaussianWeight) in module order (the order of `bayesian_weights`); `layout`
    (a FlatLayout) says which elements of every flat tensor are layer i's, in which order.
    """

    def __init__(self, model: nn.Module, weights: list[tuple[nn.Module, str, GaussianWeight]]):
        mus = [m.parametrizations[n].original for m, n, _ in weights]
        log_sigmas = [g.log_sigma for _, _, g in weights]
        for kind, tensors in (("mu", mus), ("log sigma", log_sigmas)):
            if len({(t.dtype, t.device) for t in tensors}) > 1:
                raise ValueError(f"the Bayesian weights' {kind} tensors differ in dtype or device; convert the "
                                 "model to one dtype and device before make_bayesian")
        self.layout = FlatLayout([tuple(t.shape) for t in mus], [isinstance(m, _CAST) for m, _, _ in weights])
        model.register_parameter(MU, nn.Parameter(self.layout.flatten([t.detach() for t in mus])))
        model.register_parameter(LOG_SIGMA, nn.Parameter(self.layout.flatten([t.detach() for t in log_sigmas])))
        self.model = model
        priors = {g.prior_sigma for _, _, g in weights}
        self.prior_sigma = priors.pop() if len(priors) == 1 else None  # None: per-layer priors, per-layer KL
        self.weights = list(weights)
        self.batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._eps_flat: torch.Tensor | None = None         # the held eps, authoritative when set
        self._eps_list: list[torch.Tensor | None] | None = None  # per-layer eps (views or tensors set one by one)
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # detached (mu, sigma) for inner passes
        self._pass_w: torch.Tensor | None = None  # the flat w of the forward under way
        self._pass_views: list[torch.Tensor] | None = None  # its per-layer views, made on first access

    # ------------------------------------------------------------------ building

    @classmethod
    def adopt(cls, model: nn.Module, weights: list[tuple[nn.Module, str, GaussianWeight]]) -> FlatPosterior:
        """Move the per-layer mu and log sigma Parameters of `weights` into one FlatPosterior held by `model`,
        and hook it into `model`'s forward (one w for all layers per forward)."""
        posterior = cls(model, weights)
        for index, (module, name, g) in enumerate(weights):
            plist = module.parametrizations[name]
            del plist._parameters["original"]
            plist.__class__ = _FlatParametrizationList
            del g._parameters["log_sigma"]
            g.__dict__.pop("eps", None)  # from now on held by the posterior
            g.__class__ = _FlatGaussianWeight
            for part in (plist, g):
                part.__dict__["_posterior"], part.__dict__["_index"] = posterior, index
        model.__dict__[ATTRIBUTE] = posterior
        model.register_forward_pre_hook(_begin_pass)
        model.register_forward_hook(_end_pass, always_call=True)
        model.register_state_dict_post_hook(_drop_flat_keys)
        model.register_load_state_dict_post_hook(_flat_keys_are_not_missing)
        return posterior

    # ------------------------------------------------------------------ the flat Parameters

    @property
    def mu(self) -> nn.Parameter:
        return self.model._parameters[MU]

    @property
    def log_sigma(self) -> nn.Parameter:
        return self.model._parameters[LOG_SIGMA]

    # ------------------------------------------------------------------ per-layer views

    @property
    def numel(self) -> int:
        return self.mu.numel()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return self.layout.shapes

    def relayout(self, layout: FlatLayout) -> None:
        """Lay mu and log sigma out by `layout` (the same layers; every weight keeps its values). Before the
        optimizer sees them: their gradients and a held eps are dropped."""
        if layout.shapes != self.layout.shapes:
            raise ValueError("a new flat layout must hold the same layers")
        with torch.no_grad():
            for param in (self.mu, self.log_sigma):
                param.copy_(layout.convert(param, self.layout))  # convert's cat is a new tensor: no aliasing
                param.grad = None
        self.layout = layout
        self._eps_flat = self._eps_list = None

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views of a flat tensor laid out as mu."""
        return self.layout.split(flat)

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        return self.layout.layer(flat, index)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat tensor from per-layer tensors (one cat; gradients flow back to them)."""
        return self.layout.flatten(tensors)

    # ------------------------------------------------------------------ eps

    def hold(self, eps: torch.Tensor) -> None:
        """Hold a flat eps (it may require grad) and put every weight in mode "fixed"."""
        self._eps_flat, self._eps_list = eps, None
        self._fix_modes()

    def hold_list(self, eps: Sequence[torch.Tensor]) -> None:
        """Hold per-layer eps tensors (flattened at every forward) and set mode "fixed"."""
        self._eps_flat, self._eps_list = None, list(eps)
        self._fix_modes()

    def _fix_modes(self) -> None:
        for _, _, g in self.weights:
            if g.mode != "fixed":  # reading is cheap, Module.__setattr__ is not (six holds per AS step)
                g.mode = "fixed"

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A flat eps ~ N(0, 1) in float32: one randn on the generator's device (or mu's), then moved."""
        device = generator.device if generator is not None else self.mu.device
        eps = torch.randn(self.numel, generator=generator, device=device, dtype=torch.float32)
        return eps.to(self.mu.device)

    @property
    def eps(self) -> torch.Tensor | None:
        """The held eps as one flat tensor (None if some weight holds none). Per-layer eps given by `set_noise`
        are concatenated at every forward, not once: a caller may change them in place between forwards (as
        the reference code's eps buffers are), and the layers must see the change, as they always did."""
        if self._eps_flat is not None:
            return self._eps_flat
        if self._eps_list is not None and all(e is not None for e in self._eps_list):
            return self.flatten(self._eps_list)
        return None

    def eps_list(self) -> list[torch.Tensor | None]:
        """The held eps per layer (views of the flat eps, made once per hold, so repeated calls agree)."""
        if self._eps_list is None:
            self._eps_list = [None] * len(self.weights) if self._eps_flat is None else self.split(self._eps_flat)
        return self._eps_list

    def set_layer_eps(self, index: int, eps: torch.Tensor | None) -> None:
        layers = self.eps_list()
        layers[index] = eps
        self._eps_flat = None  # from now on the per-layer tensors are what the layers see

    # ------------------------------------------------------------------ weights for one forward

    def uniform_mode(self) -> str | None:
        modes = {g.mode for _, _, g in self.weights}
        return modes.pop() if len(modes) == 1 else None

    def sample(self, mode: str) -> torch.Tensor:
        """The flat weights w for one forward in `mode` (all weights share it)."""
        if mode == "mean":
            return self.mu
        if mode == "sample":
            eps = torch.randn_like(self.mu, dtype=torch.float32)
        else:
            eps = self.eps
            if eps is None:
                raise RuntimeError("noise mode is 'fixed' but no eps was set (use asbatch.bayes.set_noise)")
        mu, sigma = self._frozen if self._frozen is not None else (self.mu, self.log_sigma.exp())
        return torch.addcmul(mu, sigma, eps) if mu.dtype == sigma.dtype == eps.dtype else mu + sigma * eps

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Forwards inside use detached mu and sigma (one exp for all of them): for the AS inner passes, which
        differentiate w.r.t. eps only."""
        before = self._frozen
        with torch.no_grad():
            self._frozen = (self.mu.detach(), self.log_sigma.exp())
        try:
            yield
        finally:
            self._frozen = before

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, sigma_0^2)) summed over all weights, in at least fp32 (see GaussianWeight.kl)."""
        if self.prior_sigma is None:
            return torch.stack([g.kl(self.view(self.mu, i)) for i, (_, _, g) in enumerate(self.weights)]).sum()
        mu = self.mu if self.mu.dtype in _FULL else self.mu.float()
        log_sigma = self.log_sigma if self.log_sigma.dtype == mu.dtype else self.log_sigma.to(mu.dtype)
        var0 = self.prior_sigma**2
        # sum of log(s0) - log s + (s^2 + mu^2) / (2 s0^2) - 1/2, the constants summed once
        per_element = torch.addcmul((2 * log_sigma).exp(), mu, mu).div_(2 * var0).sub_(log_sigma)
        return per_element.sum() + self.numel * (math.log(self.prior_sigma) - 0.5)

    def begin_pass(self) -> None:
        """Compute w for all layers at once for one model forward; each layer gets its view (`current`) on its
        first access. Weights in mixed noise modes fall back to each layer computing its own."""
        mode = self.uniform_mode()
        self._pass_w = None if mode is None else self.sample(mode)
        self._pass_views = None

    def current(self, index: int) -> torch.Tensor | None:
        """Layer `index`'s weight in this forward (None outside one). The views are made on the first access,
        inside the model's forward: under autocast the conv and linear weights are cast there, in one op."""
        if self._pass_w is None:
            return None
        if self._pass_views is None:
            low = _autocast_dtype(self._pass_w)
            self._pass_views = (self.split(self._pass_w) if low is None
                                else self.layout.split_casting(self._pass_w, low))
        return self._pass_views[index]

    def end_pass(self) -> None:
        self._pass_w = self._pass_views = None


class FlatLayout:
    """Where each layer's elements sit in a flat tensor: layers that autocast casts (`cast`: conv, linear) come
    first, the others (BatchNorm's affine weights, kept in fp32 under autocast) after them, each group in module
    order. So a pass under autocast casts all its cast weights in one op (`split_casting`) instead of one per
    layer, and their gradients come back in one cat and one cast.

    With `channels_last`, a 4-D (conv) weight's elements are in (out, kernel height, kernel width, in) order, so
    its view has torch.channels_last strides and a channels_last conv uses it without a copy (forward and
    backward); without it, every layer's elements are in its own (contiguous) order."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], cast: Sequence[bool], channels_last: bool = False):
        self.shapes, self.cast = list(shapes), list(cast)
        self.channels_last = channels_last
        self.nhwc = [channels_last and len(s) == 4 for s in self.shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.order = [i for i, c in enumerate(cast) if c] + [i for i, c in enumerate(cast) if not c]
        self.flat_sizes = [self.sizes[i] for i in self.order]  # in flat order
        self.slot = [0] * len(self.sizes)  # layer i is part slot[i] of a split
        self.offsets = [0] * len(self.sizes)
        position = 0
        for part, i in enumerate(self.order):
            self.slot[i], self.offsets[i], position = part, position, position + self.sizes[i]
        self.cast_layers = sum(1 for c in cast if c)
        self.n_cast = sum(self.sizes[i] for i in self.order[:self.cast_layers])  # elements of the cast layers
        self.numel = position

    @classmethod
    def module_order(cls, shapes: Sequence[tuple[int, ...]]) -> FlatLayout:
        """Every layer in module order, contiguous (the flat layout before the cast layers came first)."""
        return cls(shapes, [False] * len(shapes))

    def with_channels_last(self, channels_last: bool) -> FlatLayout:
        return FlatLayout(self.shapes, self.cast, channels_last)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatLayout) and (self.shapes, self.order, self.nhwc) == (
            other.shapes, other.order, other.nhwc)

    __hash__ = None  # compared, never used as a key

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One flat tensor from per-layer tensors (one cat; gradients flow back to them)."""
        return torch.cat([tensors[i].permute(0, 2, 3, 1).reshape(-1) if self.nhwc[i] else tensors[i].reshape(-1)
                          for i in self.order])

    def convert(self, flat: torch.Tensor, source: FlatLayout) -> torch.Tensor:
        """`flat`, laid out by `source` (the same layers), in this layout."""
        return self.flatten(source.split(flat))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer views of a flat tensor (one op-free split, then reshapes), in layer order."""
        return self._in_layer_order(flat.split(self.flat_sizes))

    def layer(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Layer `index`'s view of a flat tensor."""
        return self._shaped(flat.narrow(0, self.offsets[index], self.sizes[index]), index)

    def split_casting(self, flat: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """As `split`, with the cast layers' views in `dtype`: one cast for all of them (their backward: one cat
        and one cast back)."""
        low, full = flat.split([self.n_cast, self.numel - self.n_cast])
        k = self.cast_layers
        return self._in_layer_order([*low.to(dtype).split(self.flat_sizes[:k]), *full.split(self.flat_sizes[k:])])

    def _in_layer_order(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Flat-order parts as per-layer views, in layer order."""
        return [self._shaped(parts[self.slot[i]], i) for i in range(len(self.shapes))]

    def _shaped(self, part: torch.Tensor, index: int) -> torch.Tensor:
        """Layer `index`'s 1-D part of a flat tensor as a view of the layer's shape."""
        if self.nhwc[index]:
            out, channels, height, width = self.shapes[index]
            return part.view(out, height, width, channels).permute(0, 3, 1, 2)
        return part.view(self.shapes[index])


def _autocast_dtype(w: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast fp32 weight `w` to in a conv or linear now, or None (autocast off, or a
    device without autocast, such as meta)."""
    device = w.device.type
    if w.dtype != torch.float32 or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _begin_pass(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a Bayesian model: w for all layers, once."""
    model.__dict__[ATTRIBUTE].begin_pass()


def _end_pass(model: nn.Module, args: Any, output: Any) -> None:
    model.__dict__[ATTRIBUTE].end_pass()


def _drop_flat_keys(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: the flat Parameters are saved by the layers, under their per-layer keys."""
    for name in (MU, LOG_SIGMA):
        state_dict.pop(prefix + name, None)


def _flat_keys_are_not_missing(model: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook: the layers loaded the flat Parameters through their views."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k.rpartition(".")[2] not in (MU, LOG_SIGMA)]


def _load_view(view: torch.Tensor, state_dict: dict[str, Any], key: str, strict: bool, missing_keys: list[str],
               error_msgs: list[str]) -> None:
    """Copy state_dict[key] (removed from it) into a view of a flat Parameter, as torch loads a Parameter."""
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return
    value = state_dict.pop(key)
    if not isinstance(value, torch.Tensor) or value.shape != view.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                          f"the shape in current model is {tuple(view.shape)}.")
        return
    with torch.no_grad():
        view.copy_(value)


class _SavedAsView:
    """Saves and loads one per-layer view of a flat Parameter under the key the layer always had (`KEY`), so
    a state_dict keeps the per-layer layout; loading writes through the view into the flat Parameter."""

    KEY: str

    def _view(self) -> torch.Tensor:
        return getattr(self, self.KEY)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + self.KEY] = self._view() if keep_vars else self._view().detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        _load_view(self._view(), state_dict, prefix + self.KEY, strict, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _FlatParametrizationList(_SavedAsView, ParametrizationList):
    """A layer's parametrization list whose `original` (mu) is a view of the model's flat mu."""

    KEY = "original"

    @property
    def original(self) -> torch.Tensor:
        return self._posterior.view(self._posterior.mu, self._index)

    def forward(self) -> torch.Tensor:
        # Inside a model forward the posterior has computed this weight already: return it without mu's view
        # and the GaussianWeight call (host time: this runs for every weight of every pass).
        current = self._posterior.current(self._index)
        return current if current is not None else super().forward()


class _FlatGaussianWeight(_SavedAsView, GaussianWeight):
    """A GaussianWeight whose log sigma and eps live in the model's FlatPosterior (per-layer views)."""

    KEY = "log_sigma"

    @property
    def log_sigma(self) -> torch.Tensor:
        return self._posterior.view(self._posterior.log_sigma, self._index)

    @property
    def eps(self) -> torch.Tensor | None:
        return self._posterior.eps_list()[self._index]

    @eps.setter
    def eps(self, value: torch.Tensor | None) -> None:
        self._posterior.set_layer_eps(self._index, value)

    @property
    def current(self) -> torch.Tensor | None:
        return self._posterior.current(self._index)


def flat_posterior(model: nn.Module) -> FlatPosterior | None:
    """The model's FlatPosterior (None for a deterministic model); a torch.compile'd model's is its module's."""
    return getattr(model, "_orig_mod", model).__dict__.get(ATTRIBUTE)
