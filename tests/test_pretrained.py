"""``albef.load`` / ``albef.save_pretrained`` / ``albef.push_to_hub``: one call from an official checkpoint
(architecture read from its tensors), our export, a run directory, a saved folder or a hub id (a real
huggingface_hub cache, offline) to a model in eval mode with its image preprocessing and tokenizer; and a model
pushed through huggingface_hub's commit API (to a hub on 127.0.0.1) comes back the same."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import albef
from albef.models import build_model, model_config
from albef.models.convert import CheckpointError, save_official
from albef.pretrained import Preprocess, infer_model_config

REPO = Path(__file__).resolve().parents[1]


def _features(model, image, ids, mask):
    with torch.no_grad():
        return model.image_feat(model.encode_image(image)), model.text_feat(model.encode_text(ids, mask))


def test_official_checkpoint_loads_with_its_architecture_read_from_the_tensors(parity_pretrain, tmp_path):
    """The official code's tiny model, saved as its training script does ({'model': state_dict}, no config):
    albef.load finds the tiny preset and the image size, and reproduces the official features."""
    ref = parity_pretrain
    path = tmp_path / "official.pth"
    torch.save({"model": ref["state_dict"]}, path)
    model, preprocess, tokenizer = albef.load(path)
    assert not model.training and type(model).__name__ == "ALBEFPretrain"  # the checkpoint's own kind
    assert model.cfg.vision.img_size == ref["image"].shape[-1] == preprocess.image_size
    image_feat, text_feat = _features(model, ref["image"], ref["input_ids"], ref["attention_mask"])
    torch.testing.assert_close(image_feat, ref["image_feat"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_feat, ref["text_feat"], rtol=1e-4, atol=1e-5)
    assert tokenizer(ref["raw_captions"][:1], max_length=ref["input_ids"].shape[1])["input_ids"].shape[0] == 1
    # the same checkpoint as a retrieval model (ITC/ITM only), in bfloat16
    retrieval = albef.load(path, task="retrieval", dtype=torch.bfloat16).model
    assert type(retrieval).__name__ == "ALBEFRetrieval" and next(retrieval.parameters()).dtype == torch.bfloat16


def test_export_run_directory_and_saved_folder_round_trip(tmp_path):
    cfg = model_config("demo")  # tiny widths at 48 px: inference from tensors alone would also say 48 px
    torch.manual_seed(0)
    model = build_model(cfg, "retrieval").eval()
    image = torch.randn(2, 3, 48, 48)
    ids, mask = torch.randint(1000, 2000, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    ids[:, 0] = 101
    expected = _features(model, image, ids, mask)

    run_cfg = {"model": dataclasses.asdict(cfg), "train": {"output_dir": "x"}}
    save_official(model, tmp_path / "final.pth", config=run_cfg)  # what the engine exports
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    folder = albef.save_pretrained(
        model,
        tmp_path / "hub",
        description="The demo model.",
        training_data="The demo world.",
        metrics={"test/txt_r1": 55.0},
    )
    for source in (tmp_path / "final.pth", tmp_path, folder):
        loaded = albef.load(source)
        assert loaded.model.cfg == cfg, source  # the config travels (init range, momentum... not guessed)
        for got, want in zip(_features(loaded.model, image, ids, mask), expected):
            torch.testing.assert_close(got, want)
    card = (folder / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: albef") and "| test/txt_r1 | 55.00 |" in card and "The demo world." in card
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.pth"]


def test_hub_id_resolves_through_the_huggingface_cache_offline(tmp_path):
    """A real huggingface_hub snapshot lookup with HF_HUB_OFFLINE=1: the cache layout the hub client writes."""
    torch.manual_seed(0)
    model = build_model("tiny", "retrieval")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someorg--albef-tiny"
    albef.save_pretrained(model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = (
        "import albef, json; m = albef.load('someorg/albef-tiny').model; "
        "print(json.dumps([type(m).__name__, m.cfg.vision.img_size]))"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.splitlines()[-1]) == ["ALBEFRetrieval", 64]


class _Hub:
    """The hub's commit API on 127.0.0.1, as much of it as a one-commit upload uses: create a repo, validate a model
    card's YAML, ask each file's upload mode (here always "regular": the content travels in the commit), commit."""

    def __init__(self):
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.repos, self.commits, self.requests = {}, [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                hub.requests.append((path, self.headers.get("Authorization")))
                if path == "/api/repos/create":
                    req = json.loads(data)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.repos.setdefault(repo, {"private": req.get("visibility") == "private", "files": {}})
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                parts = path.split("/")  # /api/models/<org>/<name>/<preupload|commit>/<revision>
                repo = "/".join(parts[3:5])
                if repo not in hub.repos:
                    return self._reply(404, {"error": f"Repository {repo} not found"})
                if parts[5] == "preupload":
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in json.loads(data)["files"]
                    ]
                    return self._reply(200, {"files": files})
                lines = [json.loads(x) for x in data.splitlines() if x.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                for x in lines:
                    if x["key"] == "file":
                        hub.repos[repo]["files"][x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                hub.commits.append((repo, parts[6], header["summary"]))
                oid = f"{len(hub.commits):040x}"
                return self._reply(
                    200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid}
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_push_to_hub_uploads_a_folder_that_loads_back(tmp_path, monkeypatch):
    """push_to_hub through huggingface_hub's real client: a model (saved with its card on the way) and a
    save_pretrained folder each become one commit of config.yaml, model.pth and README.md; the pushed files load
    back into the same model; the card's example loads the repo id; a folder that is not a saved model is refused
    before anything is sent."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub = _Hub()
    try:
        torch.manual_seed(0)
        model = build_model("tiny", "retrieval").eval()
        url = albef.push_to_hub(
            model,
            "someorg/albef-tiny",
            token="hf_test",
            endpoint=hub.url,
            private=True,
            training_data="The demo world.",
            metrics={"r_mean": 50.0},
        )
        assert url.startswith(f"{hub.url}/someorg/albef-tiny/commit/")
        repo = hub.repos["someorg/albef-tiny"]
        assert repo["private"] and sorted(repo["files"]) == ["README.md", "config.yaml", "model.pth"]
        assert hub.commits == [("someorg/albef-tiny", "main", "Upload ALBEF model")]
        assert all(auth == "Bearer hf_test" for _, auth in hub.requests)
        card = repo["files"]["README.md"].decode()
        assert 'albef.load("someorg/albef-tiny")' in card and "| r_mean | 50.00 |" in card
        pulled = tmp_path / "pulled"
        pulled.mkdir()
        for name, content in repo["files"].items():
            (pulled / name).write_bytes(content)
        loaded = albef.load(pulled).model
        assert loaded.cfg == model.cfg
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k

        folder = albef.save_pretrained(model, tmp_path / "saved")
        albef.push_to_hub(folder, "someorg/albef-tiny", token="hf_test", endpoint=hub.url, commit_message="again")
        assert hub.commits[-1] == ("someorg/albef-tiny", "main", "again")
        assert repo["files"]["model.pth"] == (folder / "model.pth").read_bytes()

        sent = len(hub.requests)
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="not a save_pretrained folder .missing config.yaml, model.pth"):
            albef.push_to_hub(tmp_path / "empty", "someorg/other", token="hf_test", endpoint=hub.url)
        with pytest.raises(ValueError, match="model card fields"):
            albef.push_to_hub(folder, "someorg/other", token="hf_test", endpoint=hub.url, metrics={"a": 1})
        assert len(hub.requests) == sent
    finally:
        hub.server.shutdown()


def test_preprocess_takes_paths_bytes_and_pil_images(tmp_path):
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    img.paste((20, 20, 220), (40, 0, 80, 60))
    img.save(tmp_path / "a.png")
    pre = Preprocess(64)
    from_path, from_bytes, from_pil = pre(tmp_path / "a.png"), pre((tmp_path / "a.png").read_bytes()), pre(img)
    assert from_path.shape == (3, 64, 64) and from_path.dtype == torch.float32
    torch.testing.assert_close(from_path, from_bytes) and torch.testing.assert_close(from_path, from_pil)
    assert from_path[0, 32, 5] > 1.0 and from_path[2, 32, 60] > 1.0  # red left half, blue right half, normalised
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    assert pre(buf.getvalue()).shape == (3, 64, 64)


def test_unknown_architectures_and_sources_are_clear_errors(tmp_path):
    sd = build_model("tiny", "retrieval").state_dict()
    sd["vision_proj.weight"] = torch.zeros(48, 64)  # an ITC width no preset has
    with pytest.raises(CheckpointError, match=r"no preset of \['base', 'small', 'tiny'\].*model=<preset or YAML>"):
        infer_model_config(sd, "x.pth")
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(Exception, match="size mismatch|shape"):
        albef.load(tmp_path / "odd.pth", model="tiny")  # the stated architecture, and the tensor that disagrees
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or folder"):
        albef.load(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected config.yaml with model.pth"):
        albef.load(tmp_path / "empty")
