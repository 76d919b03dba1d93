"""Data-parallel fine-tuning (torchrun DDP, gloo on CPU) equals the one-process path: gradients,
loss curve and weights; and the same through Dagster Pipes from the finetuned_checkpoint asset.

The reference everywhere is the one-process path, itself checked against a hand-written
InfoNCE and transformers' CLIP loss in test_training.py. Tolerances: the two paths differ only
by float rounding (a slice of the batch through each matrix product, gradient sums in another
order), measured at ~1e-7 relative on losses and ~3e-6 absolute on weights after 3 Adam epochs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from spur_assets.core.model.clip_model import load_checkpoint, new_small_clip, save_checkpoint
from spur_assets.core.model.distributed import init_data_parallel, padded_shard, resolve_backend, shard_sizes
from spur_assets.core.model.training import TrainConfig, batch_loss, epoch_batches, train_clip
from spur_assets.core.model.training_job import TrainingJob, read_training_job, read_training_result, write_training_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=300, max_text_length=8, patch_size=8, width=32, layers=1, heads=2, projection_dim=16)
COLOURS = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a {} square", "the colour {}", "{} block"]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


def colour_task(n_images: int = 45):
    """Noisy one-colour 16-px images with 1-3 captions each (uneven), and hard negatives both ways."""
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40]], dtype=torch.uint8)
    labels = torch.arange(n_images) % 4
    images = values[labels][:, :, None, None].expand(n_images, 3, 16, 16).clone()
    images = (images.int() + torch.randint(-40, 40, images.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
    captions, caption_image = [], []
    for image in range(n_images):
        for template in TEMPLATES[: 1 + image % 3]:
            captions.append(template.format(COLOURS[int(labels[image])]))
            caption_image.append(image)
    caption_image = torch.tensor(caption_image)
    hard_negative_text = torch.full((n_images,), -1)
    for image in range(0, n_images, 3):
        hard_negative_text[image] = (caption_image != image).nonzero()[image % 7].item()
    hard_negative_image = torch.full((len(captions),), -1)
    for caption in range(0, len(captions), 4):
        hard_negative_image[caption] = (int(caption_image[caption]) + 5) % n_images
    return images, captions, caption_image, hard_negative_text, hard_negative_image


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# --------------------------------------------------------------------------- slicing, backends, job files


def test_shard_sizes_cut_like_tensor_split_and_padding_is_dropped_again():
    for n_rows in (1, 2, 5, 7, 16):
        for world in (1, 2, 3):
            expected = [len(part) for part in torch.tensor_split(torch.arange(n_rows), world)]
            assert shard_sizes(n_rows, world) == expected
    rows = torch.tensor([10, 11, 12, 13, 14])
    # 5 rows on 2 ranks: [10, 11, 12] and [13, 14] padded with rows[0] to 3 entries.
    assert padded_shard(rows, 0, 2).tolist() == [10, 11, 12]
    assert padded_shard(rows, 1, 2).tolist() == [13, 14, 10]
    # 1 row on 3 ranks: every rank still computes one row, ranks 1 and 2 only padding.
    assert [padded_shard(rows[:1], r, 3).tolist() for r in range(3)] == [[10], [10], [10]]
    with pytest.raises(ValueError, match="no rows"):
        padded_shard(rows[:0], 0, 2)


def test_backend_auto_is_gloo_on_cpu_and_nccl_is_refused_there():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("mpi", torch.device("cpu"))


def test_outside_torchrun_the_missing_variables_are_named():
    with pytest.raises(RuntimeError, match=r"\['RANK', 'WORLD_SIZE'.*torchrun"):
        init_data_parallel("gloo", "cpu", environ={"LOCAL_RANK": "0"})


def test_training_job_round_trips_through_its_folder(tmp_path):
    images, captions, caption_image, hard_text, hard_image = colour_task(9)
    config = TrainConfig(epochs=2, batch_size=5, seed=3, captions_per_image=None)
    job = TrainingJob(images, captions, caption_image, hard_text, None, config, tmp_path / "base", tmp_path / "out",
                      None, device="cpu", dist_backend="gloo")
    back = read_training_job(write_training_job(tmp_path / "job", job))
    assert torch.equal(back.images, images) and back.images.dtype == torch.uint8
    assert torch.equal(back.caption_image, caption_image) and torch.equal(back.hard_negative_text, hard_text)
    assert back.hard_negative_image is None and back.resume_dir is None
    assert back.captions == captions and back.config == config
    assert (back.base_checkpoint, back.output_checkpoint, back.dist_backend) == (tmp_path / "base", tmp_path / "out", "gloo")
    description = json.loads((tmp_path / "job" / "job.json").read_text())
    description["config"]["momentum"] = 0.9
    (tmp_path / "job" / "job.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="job.json field config has keys \\['momentum'\\]"):
        read_training_job(tmp_path / "job")


# --------------------------------------------------------------------------- gradients and training


GRADIENT_STEP = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from spur_assets.core.model.clip_model import load_checkpoint
from spur_assets.core.model.distributed import close_data_parallel, data_parallel_towers, init_data_parallel
from spur_assets.core.model.training import TrainConfig, batch_loss
from spur_assets.core.model.training_job import read_training_job

job = read_training_job(Path(sys.argv[1]))
batch = torch.tensor([int(c) for c in sys.argv[3].split(",")])
group, device = init_data_parallel("gloo", "cpu")
bundle = load_checkpoint(job.base_checkpoint)
towers = data_parallel_towers(bundle.model, device)
tokens = bundle.tokenizer(job.captions, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
text_id = torch.tensor([sorted(set(job.captions)).index(c) for c in job.captions])
loss = batch_loss(bundle, job.images, tokens["input_ids"], tokens["attention_mask"], text_id, job.caption_image,
                   batch, job.hard_negative_text, job.hard_negative_image, job.config, device, group, towers)
loss.backward()
if group.is_main:
    grads = {name: p.grad for name, p in bundle.model.named_parameters()}
    save_file({**grads, "loss": loss.detach().reshape(1)}, sys.argv[2])
close_data_parallel()
"""


@pytest.mark.slow
def test_two_rank_gradient_equals_the_one_process_gradient(tmp_path):
    images, captions, caption_image, hard_text, hard_image = colour_task()
    bundle = new_small_clip(captions, image_size=16, seed=1, **TINY)
    save_checkpoint(bundle, tmp_path / "base")
    config = TrainConfig(epochs=1, batch_size=16)
    write_training_job(tmp_path / "job", TrainingJob(images, captions, caption_image, hard_text, hard_image, config,
                                                     tmp_path / "base", tmp_path / "unused", None, "cpu", "gloo"))
    # 7 pairs (odd: ranks embed 4 and 3), images 0 and 3 bring hard-negative texts, several captions
    # hard-negative images, and two captions share a text (duplicate mask).
    batch = torch.tensor([0, 4, 6, 9, 13, 16, 20])
    assert len(set(caption_image[batch].tolist())) == len(batch)
    assert (hard_text[caption_image[batch]] >= 0).sum() >= 2 and (hard_image[batch] >= 0).sum() >= 2
    assert len({captions[c] for c in batch.tolist()}) < len(batch)
    script = tmp_path / "gradient_step.py"
    script.write_text(GRADIENT_STEP)
    _torchrun([str(script), str(tmp_path / "job"), str(tmp_path / "grads.safetensors"), ",".join(map(str, batch.tolist()))])
    distributed = load_file(str(tmp_path / "grads.safetensors"))

    reference = load_checkpoint(tmp_path / "base")
    tokens = reference.tokenizer(captions, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    text_id = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    loss = batch_loss(reference, images, tokens["input_ids"], tokens["attention_mask"], text_id, caption_image,
                       batch, hard_text, hard_image, config, torch.device("cpu"))
    loss.backward()
    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for name, parameter in reference.model.named_parameters():
        # Scale errors (a missing or doubled world-size factor) would be off by 2x here, which Adam
        # would hide in a loss curve; logit_scale takes the direct path, the towers the gathered one.
        torch.testing.assert_close(distributed[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert reference.model.logit_scale.grad.abs() > 0 and reference.model.text_projection.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_two_process_training_matches_the_one_process_loss_curve_and_weights(tmp_path):
    images, captions, caption_image, hard_text, hard_image = colour_task()
    save_checkpoint(new_small_clip(captions, image_size=16, seed=0, **TINY), tmp_path / "base")
    # Global batch 15 with 1-3 captions per image: batches of uneven size, odd on 2 ranks.
    config = TrainConfig(epochs=3, batch_size=15, lr=3e-3, warmup_steps=2, captions_per_image=2, log_every_steps=1)
    reference = load_checkpoint(tmp_path / "base")
    expected = train_clip(reference, images, captions, caption_image, config, "cpu",
                          hard_negative_text=hard_text, hard_negative_image=hard_image)

    job = TrainingJob(images, captions, caption_image, hard_text, hard_image, config, tmp_path / "base",
                      tmp_path / "trained", tmp_path / "resume", "cpu", "gloo")
    done = _torchrun(["-m", "spur_assets.train_worker", str(write_training_job(tmp_path / "job", job))])
    result = read_training_result(tmp_path / "job")
    assert (result["world_size"], result["dist_backend"]) == (2, "gloo")
    assert [row["pairs"] for row in result["history"]] == [row["pairs"] for row in expected]
    assert [row["loss"] for row in result["history"]] == pytest.approx([row["loss"] for row in expected], rel=LOSS_RTOL)
    assert expected[-1]["loss"] < 0.7 * expected[0]["loss"]  # it trained: the comparison is not of two no-ops
    # rank 0 alone logs progress (log_every_steps=1): one line per step, not one per rank
    steps = len(epoch_batches(caption_image, config.batch_size, config.captions_per_image, config.seed, 2))
    assert len([line for line in done.stdout.splitlines() if line.startswith("epoch 3 step")]) == steps
    trained = load_checkpoint(tmp_path / "trained")
    for (name, ours), (_, theirs) in zip(trained.model.state_dict().items(), reference.model.state_dict().items()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["epoch-0003"]  # rank 0 kept the resumable state


# --------------------------------------------------------------------------- through Dagster Pipes

UPSTREAM = {
    "spurious_features": {"min_support": 5},
    "base_checkpoint": {"epochs": 1, "width": 32, "layers": 1, "heads": 2, "image_size": 32, "vocab_size": 300,
                        "batch_size": 32},
    "synthetic_counterfactuals": {"workers": 1, "train_removal_per_pair": 6, "train_paste_per_pair": 6},
}
FINETUNE = {"epochs": 2, "batch_size": 24, "workers": 1}


@pytest.mark.slow
def test_finetuned_checkpoint_on_two_torchrun_processes_under_dagster_matches_one_process(tmp_path):
    from spur_assets.pipeline.counterfactual_assets import synthetic_counterfactuals
    from spur_assets.pipeline.expose import spurious_features
    from spur_assets.pipeline.ingest import batches, raw_pairs
    from spur_assets.pipeline.model_assets import base_checkpoint, finetuned_checkpoint
    from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
    from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
    from spur_assets.pipeline.resources import SpurSettings
    from spur_assets.core.records.lineage import LineageStore

    assets = [raw_pairs, spurious_features, base_checkpoint, synthetic_counterfactuals, finetuned_checkpoint]
    settings = SpurSettings(home=str(tmp_path / "home"), device="cpu")
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["builtin"])
        raw_config = {"builtin_n_train": 150, "builtin_n_test": 40, "workers": 1}
        assert dg.materialize(assets, selection=[raw_pairs.key], partition_key="builtin", instance=instance,
                              resources=resources, run_config={"ops": {"raw_pairs": {"config": raw_config}}}).success
        assert dg.materialize(assets, selection=[a.key for a in assets[1:4]], instance=instance, resources=resources,
                              run_config={"ops": {k: {"config": v} for k, v in UPSTREAM.items()}}).success
        runs = {}
        for nproc in (1, 2):
            config = {**FINETUNE, "nproc_per_node": nproc, "dist_backend": "gloo"}
            result = dg.materialize(assets, selection=[finetuned_checkpoint.key], instance=instance, resources=resources,
                                    run_config={"ops": {"finetuned_checkpoint": {"config": config}}})
            assert result.success
            runs[nproc] = result.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
        two_run_logs = [e.message for e in instance.all_logs(result.run_id) if e.message]

    one, two = runs[1], runs[2]
    # Pipes metadata reported by rank 0 arrived on the materialization; the 1-process path has none.
    assert two["world_size"].value == 2 and two["dist_backend"].value == "gloo" and two["worker_device"].value == "cpu"
    assert two["train_seconds"].value > 0 and "world_size" not in one
    assert any("epoch 2 step" in message for message in two_run_logs), "rank 0's progress lines reach the run log"
    histories = {n: pl.read_parquet(Path(runs[n]["artifact_dir"].value) / "finetuned_checkpoint_history.parquet")
                 for n in (1, 2)}
    assert histories[2]["loss"].to_list() == pytest.approx(histories[1]["loss"].to_list(), rel=LOSS_RTOL)
    assert two["loss_by_epoch"].value == pytest.approx(histories[1]["loss"].to_list(), rel=LOSS_RTOL)
    assert two["final_loss"].value == pytest.approx(one["final_loss"].value, rel=LOSS_RTOL)
    weights = {n: load_checkpoint(Path(runs[n]["artifact_dir"].value) / "checkpoint").model.state_dict() for n in (1, 2)}
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=0, atol=WEIGHT_ATOL, msg=name)
    # Both materializations are recorded in lineage the same way, with edges to the same inputs.
    store = LineageStore(settings.home_path)
    tuned = store.latest("finetuned_checkpoint")
    assert tuned["materialization_id"] == two["materialization_id"].value
    assert {"synthetic_counterfactuals", "base_checkpoint", "raw_pairs"} <= set(store.ancestry(tuned["materialization_id"])["asset"])
    # the resumable work folder (and the torchrun job in it) is gone after success
    assert not any((settings.home_path / "work" / "finetuned_checkpoint").iterdir())
