"""The generation engine: a registered model and a request in, a complete Zarr ensemble out.

Used alike by ``jobs/ensemble.py`` and the Serve deployment. Members are made chunk by chunk
(memory is one chunk, whatever the member count) and written as they come; a retried or
resumed request writes only the chunks that are missing, with the same bytes.

Determinism: draw k's noise comes from ``SeedSequence([seed, k])`` alone, and the decoder
always runs on batches of exactly ``batch_size`` rows (padded), so a member's values do not
depend on which other members shared its batch: :func:`regenerate` of member k alone gives the
bytes of the full run (on a given device and library build).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloudburst import storage, tracking, versions
from cloudburst.ensembles.checks import EnsembleError, check_kind, steerable
from cloudburst.ensembles.condition import (
    ConditionError,
    ObservedWindow,
    context_frames,
    known_steps,
    output_frames,
    read_condition,
    tuned_weight,
)
from cloudburst.ensembles.proposals import (
    Fit,
    Fitted,
    GaussianProposal,
    ProposalError,
    decoder_direction,
    fit_proposal,
    member_rng,
    noise_seed,
)
from cloudburst.ensembles.provenance import coordinates, provenance, steering_arrays
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import EnsembleStore, EnsembleStoreError, Layout, read_marker
from cloudburst.ensembles.union import UnionFit
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import (
    Condition,
    ConditionalSampler,
    Generative,
    LatentModel,
    NoiseSteerable,
)

DIRECTION_DRAWS = 4  # noise draws a diffusion model's extreme direction is averaged over
DIRECTION_STEPS = 10  # sampler steps it is differentiated through, at most
PILOT_DRAWS = 2**61  # the first draw index of a fit's pilot draws (beyond any member's)


@dataclass
class ResolvedModel:
    packaged: PrecipitationModel
    uri: str  # as asked
    version_uri: str  # models:/NAME/VERSION, or the asked URI when not from the registry
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)  # the registered version's tags


def resolve(uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Load ``uri`` pinned to a version: an alias is resolved to the version it points at now."""
    try:
        version_uri, run_id, tags = versions.pin_version(uri, tracking_uri)
    except tracking.TrackingError as exc:
        raise EnsembleError(str(exc)) from None
    packaged = tracking.load_model(version_uri, tracking_uri=tracking_uri)
    return ResolvedModel(packaged, uri, version_uri, run_id, tags)


# ---------------------------------------------------------------------------------- engine


@dataclass
class EnsembleResult:
    output: str
    members: int
    seconds: float
    chunks_written: int
    model_version: str
    acceptance_rate: float
    summary: dict[str, Any]
    workers: int = 1  # processes that wrote chunks (Ray workers of a fan-out)


class Generator:
    """A loaded model bound to a request: draws, decodes and writes chunks.

    How members are drawn follows the roles the model's family plays: a
    :class:`~cloudburst.models.roles.LatentModel` decodes latent draws from the scenario's
    proposal (unconditional or extreme, with importance weights); a
    :class:`~cloudburst.models.roles.ConditionalSampler` samples batches with one noise stream
    per member (unconditional or conditioned on observed frames); any other
    :class:`~cloudburst.models.roles.Generative` model samples each member from its own
    stream.
    """

    def __init__(
        self,
        request: EnsembleRequest,
        model: ResolvedModel,
        *,
        steering: np.ndarray | None = None,
    ) -> None:
        """``steering``: what another process computed for this request's proposal
        (:attr:`steering`: the unit shift direction, or the fitted Gaussian as a vector);
        workers of one ensemble take the driver's so that every chunk uses the same
        proposal."""
        self.request = request
        self.model = model
        packaged = model.packaged
        s = request.scenario
        check_kind(request, packaged.name, model.uri)
        self.window: tuple[int, int, int] = tuple(packaged.window)  # type: ignore[assignment]
        self.observed: ObservedWindow | None = None
        self.direction: np.ndarray | None = None
        self.fitted: Fit | None = None
        self.proposal: GaussianProposal | None = None
        self.latent = 0
        self.condition: Condition | None = None
        self.guidance = 0.0
        self.guidance_source = ""
        self.sampler_settings = packaged.family.sampler_settings
        self.direction_source = ""
        self.streams = not packaged.plays(LatentModel) or s.conditional
        if self.streams:
            if packaged.plays(ConditionalSampler):
                self._bind_condition(request, packaged)
            else:
                packaged.network(Generative)  # a clear error if it cannot even generate
            if s.steered:
                if not steerable(packaged.family.roles):
                    raise EnsembleError(
                        f"{model.uri} is a {packaged.name} model: its draws cannot be steered "
                        f"(proposal {s.proposal})"
                    )
                size = int(np.prod(packaged.window))
                self.direction = self._direction(size, steering, self._noise_direction)
                if s.proposal == "fitted":
                    self.fitted = self._fit(steering, size)
                self.proposal = GaussianProposal(s, size, self.direction, self.fitted)
            self.threshold = self._threshold()
            return
        net = packaged.network(LatentModel)
        self.latent = int(net.latent_size)

        def from_decoder() -> np.ndarray:
            self.direction_source = (
                "the decoder: gradient of the mean of each decoded window's top 1% values, "
                "averaged over 64 prior draws"
            )
            return decoder_direction(net, self.latent)

        self.direction = self._direction(self.latent, steering, from_decoder)
        if s.proposal == "fitted":
            self.fitted = self._fit(steering, self.latent)
        self.proposal = GaussianProposal(s, self.latent, self.direction, self.fitted)
        self.threshold = self._threshold()

    @property
    def steering(self) -> np.ndarray | None:
        """What pins this request's proposal in another process (see ``__init__``)."""
        if self.fitted is not None:
            return self.fitted.vector()
        return self.direction

    def _fit(self, pinned: np.ndarray | None, size: int) -> Fit:
        """The fitted proposal: pinned by the driver, or fitted here from pilot draws (a
        Gaussian over a latent code; a union of local events over a sampler's noise)."""
        window: tuple[int, int, int] | None = None
        if self.streams:
            t, y, x = self.model.packaged.window
            window = (int(t), int(y), int(x))
        try:
            if pinned is not None:
                if window is None:
                    return Fitted.from_vector(pinned, size)
                return UnionFit.from_vector(pinned, window)

            def evaluate(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                if window is None:
                    x = self.decode(z)
                else:  # pilot draws have noise streams of their own, past every member's
                    x = self.sample_streams(PILOT_DRAWS + np.arange(len(z)), z)
                flat = x.reshape(len(x), -1)
                return flat.max(axis=1), flat.argmax(axis=1)

            s = self.request.scenario
            return fit_proposal(s, size, self.request.seed, evaluate, window)
        except (ProposalError, ValueError) as exc:
            raise EnsembleError(str(exc)) from None

    def _direction(
        self, size: int, pinned: np.ndarray | None, compute: Callable[[], np.ndarray]
    ) -> np.ndarray | None:
        """The unit shift direction of ``size`` numbers: ``pinned`` (computed by another
        process of this request), the request's, or ``compute()``; None unless shifting."""
        s = self.request.scenario
        if s.proposal != "shift":
            return None
        if pinned is not None:
            pinned = np.asarray(pinned, dtype=np.float64)
            if pinned.shape != (size,) or not np.isfinite(pinned).all():
                raise EnsembleError(
                    f"a pinned direction has {pinned.size} numbers for an input of {size}"
                )
            self.direction_source = self.direction_source or "pinned by the request's driver"
            return pinned
        if s.direction is not None:
            given = np.asarray(s.direction, dtype=np.float64)
            if given.shape != (size,) or not np.linalg.norm(given) > 0:
                raise EnsembleError(
                    f"scenario.direction must be {size} numbers, not all 0 (got {len(s.direction)})"
                )
            self.direction_source = "the request"
            return given / np.linalg.norm(given)
        try:
            return compute()
        except (ProposalError, ValueError) as exc:
            raise EnsembleError(f"{exc}; give scenario.direction") from None

    def _noise_direction(self) -> np.ndarray:
        """A steerable sampler's extreme direction for this request's condition."""
        packaged = self.model.packaged
        steps = min(DIRECTION_STEPS, int(self.request.steps or packaged.config.get("steps", 10)))
        self.direction_source = (
            f"the sampler: gradient of the soft maximum of {DIRECTION_DRAWS} samples with "
            f"respect to their initial noise, through {steps} DDIM steps"
        )
        net = packaged.network(NoiseSteerable)
        d = net.extreme_direction(self.condition, draws=DIRECTION_DRAWS, steps=steps)
        return d.detach().double().cpu().numpy().reshape(-1)

    def _bind_condition(self, request: EnsembleRequest, packaged: PrecipitationModel) -> None:
        """Read and check the observed frames; fix the output window and the known mask."""
        s = request.scenario
        frames = packaged.window[0]
        self.guidance = float(packaged.config.get("guidance", 0.0))
        self.guidance_source = "the model's default"
        if not s.conditional:
            return
        swept = tuned_weight(self.model.tags, s.kind)
        if swept is not None:  # a guidance sweep chose it for this version and scenario
            self.guidance = swept
            self.guidance_source = "the version's guidance sweep"
        try:
            known_steps(s, frames)  # checks every / context against the window
            self.observed = read_condition(
                s,
                packaged.window,
                packaged.units,
                storage.options_from(s.condition.data, request.storage) if s.condition else None,
            )
        except ConditionError as exc:
            raise EnsembleError(str(exc)) from None
        self.window = (output_frames(s, frames), *packaged.window[1:])
        if s.guidance is not None:
            self.guidance = float(s.guidance)
            self.guidance_source = "the request"
        if self.observed is not None:
            obs = self.observed
            unit = packaged.to_model_space(obs.values)
            device = packaged.device
            known = torch.from_numpy(np.nan_to_num(unit, nan=0.0))[None, None].to(device)
            mask = torch.from_numpy(obs.mask)[None, None].to(device)
            self.condition = Condition(known, mask, self.guidance)

    def _threshold(self) -> float | None:
        s = self.request.scenario
        if s.threshold is not None:
            return float(s.threshold)
        if s.threshold_quantile is None:
            return None
        quantiles = (self.model.packaged.stats or {}).get("quantiles", {})
        key = f"{s.threshold_quantile:g}"
        if key not in quantiles:
            raise EnsembleError(
                f"the model's training statistics have no {key} quantile "
                f"(they have {sorted(quantiles)}); give scenario.threshold in physical units"
            )
        return float(quantiles[key])

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Physical windows for latent rows ``z``, in padded batches of exactly batch_size."""
        packaged = self.model.packaged
        bs = self.request.batch_size
        device = packaged.device
        out = []
        for a in range(0, len(z), bs):
            rows = z[a : a + bs]
            batch = np.zeros((bs, self.latent), dtype=np.float32)
            batch[: len(rows)] = rows
            y = packaged.network(LatentModel).decode(torch.from_numpy(batch).to(device))
            out.append(packaged.to_physical(y)[: len(rows)])
        return np.concatenate(out) if out else np.zeros((0, *packaged.window), np.float32)

    def draws(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(windows, weights) of draws ``indices``."""
        if self.streams and self.proposal is None:
            return self.sample_streams(indices), np.ones(len(indices), dtype=np.float64)
        assert self.proposal is not None
        z, w = self.proposal.draw(self.request.seed, indices)
        if self.streams:
            return self.sample_streams(indices, z), w
        return self.decode(z), w

    @torch.no_grad()
    def sample_streams(self, indices: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
        """Physical windows of draws ``indices`` from a sampling model: draw k's noise
        streams are seeded from (seed, k) alone and batches are padded to exactly
        batch_size rows (padding rows have streams of their own), as for latent models.
        ``initial`` (len(indices), time x y x x): the steered initial noise of each draw (of
        its first window), whose other noise then comes from :func:`noise_seed`.
        Conditional scenarios keep the observed values where they are known."""
        packaged = self.model.packaged
        bs, seed = self.request.batch_size, self.request.seed
        out = []
        for a in range(0, len(indices), bs):
            rows = [int(k) for k in indices[a : a + bs]]
            if initial is None:
                seeds = [int(member_rng(seed, k).integers(2**62)) for k in rows]
            else:
                seeds = [noise_seed(seed, k) for k in rows]
            pads = range(bs - len(rows))
            seeds += [int(member_rng(seed, 2**62 + j).integers(2**62)) for j in pads]
            gens = [torch.Generator().manual_seed(v) for v in seeds]
            start = None
            if initial is not None:
                batch = np.zeros((bs, initial.shape[1]), dtype=np.float32)
                batch[: len(rows)] = initial[a : a + bs]
                shape = (bs, 1, *packaged.window)
                start = torch.from_numpy(batch).reshape(shape).to(packaged.device)
            u = self._sample_batch(bs, gens, start)
            out.append(packaged.to_physical(u)[: len(rows)])
        if not out:
            return np.zeros((0, *self.window), np.float32)
        x = np.concatenate(out)
        if self.observed is not None:
            obs = self.observed
            n = min(obs.values.shape[0], x.shape[1])  # an extension may be shorter
            x[:, :n] = np.where(obs.mask[:n], obs.values[:n], x[:, :n])
        return x

    def _sample_batch(
        self, bs: int, gens: list[torch.Generator], initial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(bs, 1, time, y, x) in the model's input space for the scenario; ``initial``: the
        initial noise of the (first) window."""
        from cloudburst.models.extension import extend

        packaged = self.model.packaged
        s = self.request.scenario
        if not packaged.plays(ConditionalSampler):
            # one row at a time, each from its own stream: rows do not depend on each other
            net = packaged.network(Generative)
            return torch.cat([net.sample(1, generator=g) for g in gens])
        sampler = packaged.network(ConditionalSampler)

        def draw(
            n: int, condition: Condition | None, initial: torch.Tensor | None = None
        ) -> torch.Tensor:
            return sampler.sample(
                n,
                condition=condition,
                generators=gens,
                steps=self.request.steps,
                sampler=self.request.sampler,
                initial=initial,
            )

        condition = self.condition.expand(bs) if self.condition is not None else None
        if s.kind != "extension":
            return draw(bs, condition, initial)
        frames = packaged.window[0]
        first = draw(bs, condition, initial)
        return extend(
            draw,
            bs,
            tuple(packaged.window),
            self.window[0],
            overlap=context_frames(s, frames),
            guidance=self.guidance,
            start=first,
        )

    def accepted(self, start: int, stop: int) -> np.ndarray:
        """Draw indices in [start, stop) whose window reaches the threshold, ascending.

        Whether a draw is accepted depends on the draw alone (see the module doc), so draw
        ranges can be screened in any order, by any process, and give the members
        :meth:`chunk` accepts."""
        if self.threshold is None:
            return np.arange(start, stop, dtype=np.int64)
        out = []
        for a in range(start, stop, self.request.batch_size):
            idx = np.arange(a, min(stop, a + self.request.batch_size), dtype=np.int64)
            x, _ = self.draws(idx)
            out.append(idx[x.reshape(len(x), -1).max(axis=1) >= self.threshold])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def members(
        self, candidates: np.ndarray, draws: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(precip, weight, record) of a chunk whose members are draws ``candidates`` and which
        accounts for the draws in ``draws`` (accepted or not): what :meth:`chunk` and the
        single-process path write for that chunk."""
        x, w = self.draws(np.asarray(candidates, dtype=np.int64))
        start, end = int(draws[0]), int(draws[1])
        if self.threshold is None:
            return x, w, {"draws": [start, end], "weight_sum": float(w.sum())}
        return x, w, {"draws": [start, end], "weight_sum": draw_weight_sum(self, start, end)}

    def chunk(self, layout: Layout, chunk: int, start: int) -> tuple[Any, ...]:
        """Members of ``chunk``: (precip, weight, candidate, record) from draw ``start`` on."""
        a, b = layout.span(chunk)
        need = b - a
        if self.threshold is None:
            idx = np.arange(a, b, dtype=np.int64)
            x, w = self.draws(idx)
            record = {"draws": [a, b], "weight_sum": float(w.sum())}
            return x, w, idx, record
        xs, ws, cs = [], [], []
        got, k = 0, start
        limit = self.request.scenario.max_candidates_per_member * self.request.members
        bs = self.request.batch_size
        while got < need:
            if k >= limit:
                raise EnsembleError(
                    f"after {k} draws only {a + got} members reach the threshold "
                    f"{self.threshold:g} (acceptance {(a + got) / max(k, 1):.2g}); lower the "
                    "threshold, use an extreme scenario, or raise max_candidates_per_member"
                )
            idx = np.arange(k, k + bs, dtype=np.int64)
            x, w = self.draws(idx)
            keep = np.flatnonzero(x.reshape(len(x), -1).max(axis=1) >= self.threshold)
            keep = keep[: need - got]
            xs.append(x[keep])
            ws.append(w[keep])
            cs.append(idx[keep])
            got += len(keep)
            # the chunk ends at the draw that completed it: the next chunk starts after it
            k = int(idx[keep[-1]]) + 1 if got == need and len(keep) else k + bs
        # the weights of every draw in [start, k), accepted or not, are summed by the caller
        return np.concatenate(xs), np.concatenate(ws), np.concatenate(cs), {"draws": [start, k]}


def draw_weight_sum(gen: Generator, start: int, end: int) -> float:
    """Sum of weights of every draw in [start, end) (accepted or not)."""
    if gen.proposal is None:  # plain Monte Carlo: every weight is 1
        return float(end - start)
    total = 0.0
    for a in range(start, end, 4096):
        b = min(end, a + 4096)
        total += float(gen.proposal.weights(gen.request.seed, np.arange(a, b)).sum())
    return total


def layout_of(request: EnsembleRequest, window: tuple[int, int, int]) -> Layout:
    return Layout(request.members, tuple(window), min(request.chunk_members, request.members))


@dataclass
class Opened:
    """An ensemble request bound to its model and its store, ready for chunks to be written."""

    request: EnsembleRequest
    model: ResolvedModel
    gen: Generator
    layout: Layout
    store: EnsembleStore
    options: dict[str, Any]
    complete: dict[str, Any] | None  # the completion marker when the store is already whole


def open_ensemble(
    request: EnsembleRequest,
    *,
    model: ResolvedModel | None = None,
    tracking_uri: str | None = None,
) -> Opened:
    """Resolve the model, check the request against it, and create (or reopen, to resume) the
    output store; ``complete`` is set when an earlier run already finished it."""
    options = storage.options_from(request.output, request.storage)
    storage.check_reachable(request.output, options)
    marker = read_marker(request.output, options)
    model = model or resolve(_pinned(request, options) or request.model, tracking_uri)
    gen = Generator(request, model)
    identity = {**request.identity(), "model_version_uri": model.version_uri}
    if gen.observed is not None:
        identity["condition_store_fingerprint"] = gen.observed.store_fingerprint
    layout = layout_of(request, gen.window)
    store = EnsembleStore.open(
        request.output,
        options,
        layout=layout,
        identity=identity,
        attrs=provenance(request, model, gen),
        units=model.packaged.units,
        coords=coordinates(gen.observed),
        vectors=steering_arrays(gen),
    )
    whole = marker is not None and marker.get("fingerprint") == store.group.attrs.get(
        "cloudburst_fingerprint"
    )
    return Opened(request, model, gen, layout, store, options, marker if whole else None)


def finish(opened: Opened, written: int, t0: float) -> EnsembleResult:
    """Write the completion marker once every chunk is in; the run's result."""
    request, model = opened.request, opened.model
    records = opened.store.done()
    draws = max(int(r["draws"][1]) for r in records.values())
    summary = {
        "draws": draws,
        "acceptance_rate": request.members / draws,
        "draw_weight_sum": float(sum(r["weight_sum"] for r in records.values())),
        "threshold": opened.gen.threshold,
        "model_version_uri": model.version_uri,
    }
    marker = opened.store.complete(summary)
    return result_of(request, marker, model, written, t0)


def generate(
    request: EnsembleRequest,
    *,
    model: ResolvedModel | None = None,
    tracking_uri: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> EnsembleResult:
    """Make (or finish) the ensemble ``request`` asks for, in this process; see the module doc.

    ``on_chunk(members_done, members)`` is called after each chunk is written.
    (:func:`cloudburst.ensembles.fanout.generate_on_cluster` spreads the chunks over Ray
    workers and writes the same bytes.)
    """
    t0 = time.perf_counter()
    opened = open_ensemble(request, model=model, tracking_uri=tracking_uri)
    if opened.complete is not None:
        return result_of(request, opened.complete, opened.model, 0, t0)
    gen, layout, store = opened.gen, opened.layout, opened.store
    done = store.done()
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=request.members, desc=f"ensemble {request.output}", unit="member")
        bar.update(sum(r["members"][1] - r["members"][0] for r in done.values()))
    start = 0
    for chunk in range(layout.chunks):
        if chunk in done:
            start = int(done[chunk]["draws"][1])
            continue
        x, w, cand, record = gen.chunk(layout, chunk, start)
        if gen.threshold is not None:
            record["weight_sum"] = draw_weight_sum(gen, start, record["draws"][1])
        store.write_chunk(chunk, x, w, cand, record)
        written += 1
        start = int(record["draws"][1])
        a, b = layout.span(chunk)
        if bar is not None:
            bar.update(b - a)
        if on_chunk is not None:
            on_chunk(b, request.members)
    if bar is not None:
        bar.close()
    return finish(opened, written, t0)


def _pinned(request: EnsembleRequest, options: dict[str, Any]) -> str | None:
    """The model version an earlier, interrupted run of this output was made with."""
    import json

    import zarr

    from cloudburst.ensembles.store import zarr_store

    if not storage.exists(storage.join(request.output, "zarr.json"), options):
        return None
    try:
        attrs = zarr.open_group(zarr_store(request.output, options, read_only=True)).attrs
        asked = json.loads(str(attrs.get("request", "{}")))
    except (OSError, ValueError, KeyError):
        return None
    if asked.get("model") != request.model or "model_version_uri" not in attrs:
        return None
    return str(attrs["model_version_uri"])


def result_of(
    request: EnsembleRequest,
    marker: dict[str, Any],
    model: ResolvedModel,
    written: int,
    t0: float,
) -> EnsembleResult:
    return EnsembleResult(
        output=request.output,
        members=request.members,
        seconds=time.perf_counter() - t0,
        chunks_written=written,
        model_version=model.version_uri,
        acceptance_rate=float(marker.get("acceptance_rate", 1.0)),
        summary=marker,
    )


def regenerate(
    request: EnsembleRequest,
    members: list[int] | np.ndarray,
    *,
    model: ResolvedModel | None = None,
    tracking_uri: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(windows, weights) of ``members`` alone, as the full run made them.

    With a rejecting threshold a member's draw index is read from the store's ``candidate``.
    """
    model = model or resolve(request.model, tracking_uri)
    gen = Generator(request, model)
    idx = np.asarray(members, dtype=np.int64)
    if gen.threshold is not None:
        import zarr

        from cloudburst.ensembles.store import zarr_store

        options = storage.options_from(request.output, request.storage)
        group = zarr.open_group(zarr_store(request.output, options, read_only=True), mode="r")
        idx = np.asarray(group["candidate"].get_coordinate_selection(idx))
        if (idx < 0).any():
            raise EnsembleStoreError("some of these members are not written yet")
    return gen.draws(idx)
