"""Index building on a Ray cluster (Ray Data): the encoder pass spread over an actor pool, the collection
written by this process, the one writer.

Pipeline: the sources are read here (:mod:`alignfuse.index.sources`); items not yet in the collection become
rows of a Ray dataset; CPU tasks read, hash, skip what is committed, decode and preprocess each image (the
builder's own per-item path, :class:`alignfuse.index._loading._ItemDataset`); an actor pool (``map_batches``
with a class: one model load per actor, ``num_gpus`` per actor when the cluster has GPUs) encodes images and
captions; results stream back in source order and are cut into embedding shards (:mod:`alignfuse.index.shards`,
clip-retrieval's layout). Each shard is written to disk, then committed through the
:class:`~alignfuse.index.writer.CollectionWriter` as one segment (add + commit), then its files are removed. So
a shard is committed or absent; a driver killed between writing and committing a shard leaves its files, and
the next run commits them without re-encoding; items whose content hash is live are never encoded again.

Ray is optional (``pip install 'alignfuse[ray]'``) and imported only here, when ``--engine ray`` is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfuse.errors import AlignfuseError, ConflictError, InvalidInputError, NotFoundError
from alignfuse.models.base import DualEncoder, ImageTransform

from ._loading import _ItemDataset
from .builder import BuildOptions, BuildReport, _new_item
from .collection import Collection, CollectionWriter, is_collection
from .images import decode_image
from .shards import (
    ShardData,
    commit_shard,
    list_shards,
    read_encoder_record,
    read_shard,
    remove_shard,
    shard_key,
    write_encoder_record,
    write_shard,
)
from .sources import Source, SourceItem
from .store import ShaLookup
from .types import NewItem
from .webdataset import TarMember, WebDatasetSource, read_member

log = logging.getLogger(__name__)

RAY_HINT = "--engine ray needs Ray: pip install 'alignfuse[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how the encoder pass runs.

    ``address``: a running cluster (``ray start --head`` prints it); None starts an in-process local one
    (``num_cpus`` cores, ``temp_dir`` for its files). ``actors``: encoder actors, each with ``cpus_per_actor``
    CPUs (fractional on small machines: a pool holding every CPU starves the read tasks, ray#44687;
    decoding runs in CPU tasks of ``decode_cpus`` each) and
    ``gpus_per_actor`` GPUs (None: 1 when the cluster has GPUs). ``shards_dir``: where embedding shards are
    written before they are committed (default ``<collection>.shards`` beside the collection);
    ``keep_shards``: leave them there after the commit. ``threads_per_actor``: torch threads in each actor
    (None: Ray's default, one per whole CPU of the actor)."""

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 0.5
    decode_cpus: float = 1.0
    threads_per_actor: int | None = None
    gpus_per_actor: float | None = None
    num_cpus: int | None = None
    temp_dir: Path | None = None
    shards_dir: Path | None = None
    keep_shards: bool = False


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise InvalidInputError(RAY_HINT) from None
    return ray


def default_shards_dir(collection: Path) -> Path:
    return collection.parent / f"{collection.name}.shards"


# -- the remote stages ----------------------------------------------------------------------------------
def _decode(
    batch: dict[str, np.ndarray],
    transform: ImageTransform,
    draft_size: int,
    lookup: ShaLookup,
    options: BuildOptions,
) -> dict[str, Any]:
    """CPU task: read, hash, skip committed, decode, preprocess (the builder's per-item path)."""
    torch.set_num_threads(1)
    kinds = [str(k) for k in batch["kind"]]
    items = [
        SourceItem(
            kind="image" if k == "image" else "text",
            uri="",
            text=str(t),
            path=Path(str(p)) if k == "image" else None,
            sha256=str(s) or None,
        )
        for k, p, t, s in zip(kinds, batch["path"], batch["text"], batch["sha256"], strict=True)
    ]
    ds = _ItemDataset(items, [transform], draft_size, lookup, options)
    recs: list[tuple[str, str, str, bytes]] = []  # status, sha256, reason, pixels
    for j, tar in enumerate(batch["tar"]):
        if tar:
            ref = TarMember(str(tar), int(batch["offset"][j]), int(batch["size"][j]))
            recs.append(_decode_member(ref, transform, draft_size, lookup, options))
        else:
            r = ds[j]
            pix = r.pixels[0].numpy().astype(np.float32).tobytes() if r.pixels else b""
            recs.append((r.status, r.sha256, r.reason, pix))
    cols = list(zip(*recs, strict=True)) if recs else [(), (), (), ()]
    return {
        "idx": batch["idx"],
        "kind": np.array(kinds, dtype=object),
        "text": batch["text"],
        "status": np.array(cols[0], dtype=object),
        "sha256": np.array(cols[1], dtype=object),
        "reason": np.array(cols[2], dtype=object),
        "pixels": np.array(cols[3], dtype=object),
    }


def _decode_member(
    ref: TarMember, transform: ImageTransform, draft_size: int, lookup: ShaLookup, options: BuildOptions
) -> tuple[str, str, str, bytes]:
    """An image inside a WebDataset tar: read by offset, hash, skip committed, decode, preprocess."""
    try:
        data = read_member(ref)
    except OSError as exc:
        return "failed", "", f"unreadable: {exc.strerror or exc}", b""
    sha = hashlib.sha256(data).hexdigest()
    if lookup.known([sha]):
        return "skipped", sha, "", b""
    try:
        img = decode_image(
            data,
            max_pixels=options.max_image_pixels,
            draft_size=draft_size if options.draft else None,
            what="tar member",
        )
        pixels = transform(img)
    except AlignfuseError as exc:
        return "failed", sha, exc.message, b""
    except Exception as exc:  # a transform failing on one odd image must not stop the build
        return "failed", sha, f"transform failed: {exc}", b""
    return "ok", sha, "", pixels.numpy().astype(np.float32).tobytes()


class _Encode:
    """Actor: one model load, then image and caption batches."""

    def __init__(self, spec: str, device: str, precision: str, threads: int | None = None) -> None:
        from alignfuse.models.registry import create_dual_encoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = create_dual_encoder(spec, device, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["idx"])
        emb = np.zeros((n, self.encoder.embed_dim), np.float32)
        ok = [str(s) == "ok" for s in batch["status"]]
        img = [j for j in range(n) if ok[j] and batch["kind"][j] == "image"]
        txt = [j for j in range(n) if ok[j] and batch["kind"][j] == "text"]
        if img:
            arrs = [np.frombuffer(batch["pixels"][j], np.float32) for j in img]
            side = int(round((arrs[0].size // 3) ** 0.5))
            pixels = torch.from_numpy(np.stack([a.reshape(3, side, side) for a in arrs]))
            with torch.inference_mode():
                emb[img] = self.encoder.encode_images(pixels)
        if txt:
            texts = [str(batch["text"][j]) for j in txt]
            with torch.inference_mode():
                emb[txt] = np.concatenate(
                    [self.encoder.encode_texts(texts[s : s + 256]) for s in range(0, len(texts), 256)]
                )
        return {k: batch[k] for k in ("idx", "kind", "status", "sha256", "reason")} | {"emb": emb}


# -- the driver -----------------------------------------------------------------------------------------
class _ShardCutter:
    """Collects encoded rows in source order and commits a shard every ``commit_every`` new items."""

    def __init__(
        self,
        writer: CollectionWriter,
        items: Sequence[SourceItem],
        shards: Path,
        opts: BuildOptions,
        keep: bool,
    ) -> None:
        self.writer, self.items, self.shards, self.opts, self.keep = writer, items, shards, opts, keep
        existing = list_shards(shards)
        self.next = max((int(k) for k in existing), default=-1) + 1
        self.images: list[NewItem] = []
        self.image_vecs: list[np.ndarray] = []
        self.texts: list[NewItem] = []
        self.text_vecs: list[np.ndarray] = []
        self.added_images = self.added_texts = self.skipped = self.commits = 0
        self.failed: list[tuple[str, str]] = []

    def take(self, batch: dict[str, np.ndarray]) -> None:
        for j, i in enumerate(batch["idx"].tolist()):
            it, status = self.items[i], str(batch["status"][j])
            if status == "failed":
                self.failed.append((it.uri, str(batch["reason"][j])))
                log.warning("skipping %s: %s", it.uri, batch["reason"][j])
            elif status == "skipped":
                self.skipped += 1
            elif it.kind == "image":
                self.images.append(_new_item(it, str(batch["sha256"][j])))
                self.image_vecs.append(batch["emb"][j])
            else:
                self.texts.append(_new_item(it, str(batch["sha256"][j])))
                self.text_vecs.append(batch["emb"][j])
        if self.opts.commit_every and len(self.images) + len(self.texts) >= self.opts.commit_every:
            self.flush()

    def flush(self) -> None:
        if not self.images and not self.texts:
            return
        dim = self.writer.dim
        data = ShardData(
            shard_key(self.next),
            tuple(self.images),
            np.stack(self.image_vecs) if self.image_vecs else np.zeros((0, dim), np.float32),
            tuple(self.texts),
            np.stack(self.text_vecs) if self.text_vecs else np.zeros((0, dim), np.float32),
        )
        write_shard(self.shards, data)
        self._commit(data)
        self.next += 1
        self.images, self.image_vecs, self.texts, self.text_vecs = [], [], [], []

    def _commit(self, data: ShardData, leftover: bool = False) -> None:
        a_i, a_t, s = commit_shard(self.writer, data)
        self.added_images += a_i
        self.added_texts += a_t
        if leftover:  # its items are source items the pipeline then finds committed: added, not skipped
            self.skipped -= a_i + a_t
        else:
            self.skipped += s
        self.commits += 1
        if not self.keep:
            remove_shard(self.shards, data.key)
        log.info(
            "shard %s committed: %d images, %d texts (version %d)",
            data.key,
            a_i,
            a_t,
            self.writer.base_version,
        )

    def leftovers(self) -> None:
        """Commit the complete shards a killed run wrote but did not commit (no re-encoding)."""
        rec = read_encoder_record(self.shards)
        for key in list_shards(self.shards):
            if rec is None or rec.id != self.writer.manifest.encoder.id:
                raise ConflictError(
                    f"{self.shards} holds shards of another model: remove it or choose --shards-dir"
                )
            self._commit(read_shard(self.shards, key, dim=self.writer.dim), leftover=True)


def ray_build_collection(
    path: str | Path,
    sources: Source | Sequence[Source],
    encoder: DualEncoder,
    *,
    options: BuildOptions | None = None,
    ray_options: RayOptions | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    must_exist: bool = False,
) -> BuildReport:
    """:func:`~alignfuse.index.builder.build_collection` with the encoder pass on Ray: the same items and
    embeddings (each actor loads ``encoder.info.spec``; ``encoder`` gives this process the model identity and
    the image transform)."""
    opts = options or BuildOptions()
    ropts = ray_options or RayOptions()
    if opts.batch_size < 1 or opts.commit_every < 0:
        raise InvalidInputError("batch_size must be >= 1, commit_every >= 0")
    if opts.rerank_cache:
        raise InvalidInputError(
            "--rerank-cache is not supported with --engine ray (build, then use --engine local)"
        )
    if ropts.actors < 1 or ropts.cpus_per_actor <= 0:
        raise InvalidInputError("--ray-actors must be >= 1 and CPUs per actor > 0")
    ray = _import_ray()
    t0 = time.perf_counter()
    root = Path(path)
    srcs: list[Source] = [sources] if isinstance(sources, Source) else list(sources)  # type: ignore[list-item]
    if not is_collection(root):
        if must_exist:
            raise NotFoundError(f"collection not found: {root} (create it with `alignfuse build`)")
        with contextlib.suppress(ConflictError):
            Collection.create(root, encoder.info, options=opts.index).close()
    items: list[SourceItem] = [it for s in srcs for it in s.items()]
    shards = ropts.shards_dir or default_shards_dir(root)
    with CollectionWriter(root, opts.index) as writer:
        writer.check_encoder(encoder.info)
        wanted_key = opts.index.index_key
        if wanted_key is not None and wanted_key.strip() != (writer.manifest.index_key or ""):
            raise InvalidInputError(
                f"--index-key: collection {root} uses index key {writer.manifest.index_key or 'auto'!r}"
            )
        start = writer.base_version
        cutter = _ShardCutter(writer, items, shards, opts, ropts.keep_shards)
        cutter.failed.extend(p for s in srcs for p in s.problems)
        cutter.leftovers()
        write_encoder_record(shards, encoder.info)
        known_texts = writer.known_sha256([it.sha256 or "" for it in items if it.kind == "text"])
        members: dict[str, TarMember] = {}
        for s in srcs:
            if isinstance(s, WebDatasetSource):
                members.update(s.members)
        none = TarMember("", -1, -1)
        rows = [
            {
                "idx": i,
                "kind": it.kind,
                "path": str(it.path.resolve()) if it.path is not None else "",
                "text": it.text or "",
                "sha256": it.sha256 or "",
                "tar": members.get(it.uri, none).tar,
                "offset": members.get(it.uri, none).offset,
                "size": members.get(it.uri, none).size,
            }
            for i, it in enumerate(items)
            if it.kind == "image" or it.sha256 not in known_texts
        ]
        cutter.skipped += len(items) - len(rows)
        if rows:
            lookup = ShaLookup(root.resolve(), writer.base_version)  # Ray workers run in another folder
            _run_pipeline(ray, rows, encoder, lookup, cutter, opts, ropts, device, precision)
        cutter.flush()
        ours = [sg.id for sg in writer.manifest.segments if sg.version > start]
        if opts.merge_at_end and len(ours) > 1:
            writer.merge(ours)
        version = writer.base_version
    report = BuildReport(
        collection=root,
        version=version,
        added=cutter.added_images + cutter.added_texts,
        added_images=cutter.added_images,
        added_texts=cutter.added_texts,
        skipped_existing=cutter.skipped,
        failed=tuple(cutter.failed),
        seconds=time.perf_counter() - t0,
        commits=cutter.commits,
        total_seen=len(items),
    )
    log.info(
        "%s (ray): added %d, skipped %d, %d failed, version %d",
        root,
        report.added,
        report.skipped_existing,
        len(report.failed),
        version,
    )
    return report


def _run_pipeline(
    ray: Any,
    rows: list[dict[str, Any]],
    encoder: DualEncoder,
    lookup: ShaLookup,
    cutter: _ShardCutter,
    opts: BuildOptions,
    ropts: RayOptions,
    device: str,
    precision: str,
) -> None:
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if ropts.address is None:
            kwargs |= {"address": "local", "num_cpus": ropts.num_cpus}
            if ropts.temp_dir is not None:
                kwargs["_temp_dir"] = str(Path(ropts.temp_dir).resolve())
        else:
            kwargs["address"] = ropts.address
        ray.init(**kwargs)
        started = True
    try:
        gpus = ropts.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        actor_device = "cuda" if gpus > 0 else device
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards in source order: ids as in the local build
        ctx.enable_progress_bars = opts.progress
        blocks = max(1, min(len(rows) // max(1, opts.batch_size // 2), 4096))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode,
            batch_format="numpy",
            batch_size=opts.batch_size,
            num_cpus=ropts.decode_cpus,  # differs from the actors': Ray keeps decoding in CPU tasks
            fn_kwargs={
                "transform": encoder.image_transform,
                "draft_size": encoder.info.preprocess.image_size,
                "lookup": lookup,
                "options": replace(opts, progress=False),
            },
        )
        ds = ds.map_batches(
            _Encode,
            batch_format="numpy",
            batch_size=opts.batch_size,
            compute=ray.data.ActorPoolStrategy(size=ropts.actors),
            num_cpus=ropts.cpus_per_actor,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "spec": encoder.info.spec,
                "device": actor_device,
                "precision": precision,
                "threads": ropts.threads_per_actor,
            },
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            cutter.take(batch)
    finally:
        if started:
            ray.shutdown()
