"""ALBEF checkpoints: all three official formats (built from the manifests), pos_embed interpolation, clear
errors, safetensors, and the fast offline failure of the download."""

from __future__ import annotations

import argparse
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from alignfuse.errors import CheckpointError, ModelUnavailableError
from alignfuse.models.albef.checkpoint import (
    convert_state_dict,
    extract_state_dict,
    interpolate_pos_embed,
    is_documented_extra,
    load_albef_checkpoint,
    resolve_albef_weights,
)
from alignfuse.models.albef.config import ALBEF_CONFIGS
from alignfuse.models.albef.model import AlbefModel
from tests.models.albef_helpers import build_from_manifest, format_shapes, load_manifest

TINY = ALBEF_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def base_target() -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in AlbefModel(ALBEF_CONFIGS["base"]).state_dict().items()}


@pytest.mark.parametrize("kind", ["released", "retrieval", "pretrain"])
def test_official_formats_map_onto_base_model(kind: str, base_target: dict[str, torch.Size]) -> None:
    manifest = load_manifest(kind)
    sd = build_from_manifest(manifest)  # meta tensors at the official sizes
    obj = sd if kind == "released" else {"model": sd, "epoch": 3}
    converted, fmt = extract_state_dict(obj)
    assert fmt == kind
    conv = convert_state_dict(converted, base_target)
    assert set(conv.state_dict) == set(base_target)  # no model weight left uninitialised
    assert conv.missing == ()
    assert all(is_documented_extra(k) for k in conv.ignored)
    assert len(conv.state_dict) + len(conv.ignored) == len(manifest)
    if kind == "pretrain":
        assert conv.interpolated == (("visual_encoder.pos_embed", (1, 257, 768), (1, 577, 768)),)
        assert any(k.startswith("text_encoder.cls.") for k in conv.ignored)
    else:
        assert conv.interpolated == ()
    if kind == "released":
        assert conv.ignored == ("text_encoder.embeddings.position_ids",)


def test_position_ids_absent_is_fine(base_target: dict[str, torch.Size]) -> None:
    manifest = load_manifest("released")
    manifest.pop("text_encoder.embeddings.position_ids")
    conv = convert_state_dict(build_from_manifest(manifest), base_target)
    assert conv.ignored == ()


CONTAINERS = ["bare", "model", "pretrain"]


def _container(sd: dict[str, torch.Tensor], container: str, config: object = None) -> object:
    """A state_dict as released (bare), wrapped as ALBEF's fine-tuning saves it, or as a pre-training file
    with optimizer / scheduler / config / epoch beside it."""
    if container == "bare":
        return sd
    if container == "model":
        return {"model": sd}
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 4)).sum().backward()
    opt.step()
    return {
        "model": sd,
        "optimizer": opt.state_dict(),
        "lr_scheduler": {"last_epoch": 3, "base_lrs": [1e-4]},
        "config": config if config is not None else {"image_res": 256, "batch_size": 64, "queue_size": 8},
        "epoch": 3,
    }


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", ["released", "retrieval", "pretrain"])
def test_every_manifest_in_every_container_maps_onto_base(
    kind: str, container: str, base_target: dict[str, torch.Size]
) -> None:
    sd = build_from_manifest(load_manifest(kind))
    converted, fmt = extract_state_dict(_container(sd, container))  # type: ignore[arg-type]
    assert fmt == ("pretrain" if kind == "pretrain" else ("released" if container == "bare" else "retrieval"))
    conv = convert_state_dict(converted, base_target)
    assert set(conv.state_dict) == set(base_target) and conv.missing == ()
    assert all(is_documented_extra(k) for k in conv.ignored)


def _tiny_file(
    tmp_path: Path, kind: str, *, container: str | None = None, config: object = None
) -> tuple[Path, dict[str, torch.Tensor]]:
    shapes = format_shapes(kind, TINY, pos_grid=3 if kind == "pretrain" else None)
    sd = build_from_manifest(shapes, device="cpu", seed=1)
    default = {"released": "bare", "retrieval": "model", "pretrain": "pretrain"}[kind]
    path = tmp_path / f"{kind}-{container or default}.pth"
    torch.save(_container(sd, container or default, config), path)
    return path, sd


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", ["released", "retrieval", "pretrain"])
def test_tiny_files_load_in_every_format(tmp_path: Path, kind: str, container: str) -> None:
    path, sd = _tiny_file(tmp_path, kind, container=container)
    model = AlbefModel(TINY)
    report = load_albef_checkpoint(model, path)
    assert report.weights_only
    assert report.format == (
        "pretrain" if kind == "pretrain" else ("released" if container == "bare" else "retrieval")
    )
    assert report.missing == ()
    assert all(is_documented_extra(k) for k in report.ignored)
    assert len(report.loaded) + len(report.ignored) == len(sd)
    prefix = "text_encoder.bert." if kind == "pretrain" else "text_encoder."
    ours = model.state_dict()
    torch.testing.assert_close(
        ours["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
        sd[prefix + "encoder.layer.3.crossattention.self.key.weight"],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(ours["itm_head.bias"], sd["itm_head.bias"], rtol=0, atol=0)
    pos = ours["visual_encoder.pos_embed"]
    assert pos.shape == (1, TINY.num_image_tokens, TINY.vision_width)
    if kind == "pretrain":
        assert report.interpolated == (("visual_encoder.pos_embed", (1, 10, 64), (1, 17, 64)),)
        torch.testing.assert_close(
            pos[:, 0], sd["visual_encoder.pos_embed"][:, 0], rtol=0, atol=0
        )  # CLS kept
    else:
        torch.testing.assert_close(pos, sd["visual_encoder.pos_embed"], rtol=0, atol=0)


def test_pretrain_file_with_arbitrary_objects_falls_back_to_full_unpickling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = _tiny_file(tmp_path, "pretrain", config=argparse.Namespace(image_res=256))
    with caplog.at_level("WARNING"):
        report = load_albef_checkpoint(AlbefModel(TINY), path)
    assert report.weights_only is False
    assert "weights_only=False" in caplog.text


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = AlbefModel(TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = AlbefModel(TINY.replace(init_std=0.3))
    report = load_albef_checkpoint(dst, path)
    assert report.format == "released" and not report.ignored
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)


def test_interpolation_keeps_cls_and_constant_grid() -> None:
    pos = torch.full((1, 1 + 16 * 16, 8), 0.5)
    pos[:, 0] = torch.arange(8.0)
    out = interpolate_pos_embed(pos, 1 + 24 * 24)
    assert out.shape == (1, 577, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 576, 8), 0.5))


def test_bad_checkpoints_name_the_keys(tmp_path: Path) -> None:
    good = AlbefModel(TINY).state_dict()
    missing = dict(good)
    missing.pop("itm_head.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"itm_head\.weight"):
        load_albef_checkpoint(AlbefModel(TINY), tmp_path / "missing.pth")
    extra = dict(good, **{"decoder.surprise": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['decoder\.surprise'\]"):
        load_albef_checkpoint(AlbefModel(TINY), tmp_path / "extra.pth")
    wrong = dict(good, **{"text_proj.weight": torch.zeros(3, 64)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"text_proj\.weight: checkpoint \(3, 64\)"):
        load_albef_checkpoint(AlbefModel(TINY), tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_albef_checkpoint(AlbefModel(TINY), tmp_path / "junk.pth")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_albef_checkpoint(AlbefModel(TINY), tmp_path / "absent.pth")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_download_offline_fails_fast_and_clearly(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/ALBEF"
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        resolve_albef_weights("coco", tmp_path, spec="albef:base@coco", base_url=url, timeout=2.0)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "albef:base@coco" in msg and "mscoco.pth" in msg
    assert "albef:base@/path/to/mscoco.pth" in msg
    assert elapsed < 10  # one attempt, no retry loop (a refused connection returns at once)
    assert not list((tmp_path / "albef").glob("*"))  # no partial file left behind


def test_download_and_cache(tmp_path: Path) -> None:
    served = tmp_path / "srv"
    served.mkdir()
    (served / "flickr30k.pth").write_bytes(b"x" * 3000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cache = tmp_path / "cache"
        path = resolve_albef_weights("flickr30k", cache, base_url=url, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert path == cache / "albef" / "flickr30k.pth" and path.read_bytes() == b"x" * 3000
    assert (cache / "albef" / "flickr30k.pth.sha256.json").is_file()  # checksum recorded
    # cached now: no network needed
    assert resolve_albef_weights("flickr30k", cache, base_url="http://127.0.0.1:1") == path
