"""A training process killed mid-run resumes from its last epoch and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TRAIN = r"""
import sys, torch
from pathlib import Path
from spur_assets.core.model.clip_model import new_small_clip, save_checkpoint
from spur_assets.core.model.training import TrainConfig, train_clip

torch.set_num_threads(1)
work, out, epochs, pause = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
colours = ["red", "green", "blue", "yellow"]
values = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40]], dtype=torch.uint8)
g = torch.Generator().manual_seed(0)
labels = torch.arange(64) % 4
images = values[labels][:, :, None, None].expand(64, 3, 16, 16).clone()
images = (images.int() + torch.randint(-20, 20, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
captions = [f"a {colours[int(l)]} square" for l in labels]
bundle = new_small_clip(captions, image_size=16, patch_size=8, width=32, layers=1, heads=2, vocab_size=300, max_text_length=8)

def progress(event):
    print(f"epoch {event['epoch']} step {event['step']}", flush=True)
    if pause:
        import time; time.sleep(pause)

train_clip(bundle, images, captions, torch.arange(64), TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=2, log_every_steps=1),
           "cpu", checkpoint_dir=work, progress=progress)
save_checkpoint(bundle, out)
print("done", flush=True)
"""


def _run(args, **kw):
    return subprocess.Popen([sys.executable, "-c", TRAIN, *map(str, args)], stdout=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(tmp_path):
    reference = _run([tmp_path / "ref-work", tmp_path / "ref", 3, 0])
    assert reference.wait(timeout=300) == 0

    victim = _run([tmp_path / "work", tmp_path / "resumed", 3, 0.3])
    # wait until epoch 2 is under way (epoch 1's state is then complete on disk), then SIGKILL
    for line in victim.stdout:
        if line.startswith("epoch 2"):
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    saved = sorted(p.name for p in (tmp_path / "work").glob("epoch-*") if (p / "state.json").is_file())
    assert saved == ["epoch-0001"]
    assert not (tmp_path / "resumed").exists()

    resumed = _run([tmp_path / "work", tmp_path / "resumed", 3, 0])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert "epoch 1 " not in out  # epoch 1 was not trained again
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
