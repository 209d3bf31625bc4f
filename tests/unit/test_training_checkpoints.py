"""Complete checkpoints only: the manifest, and rotation that keeps the newest complete and the best."""

from __future__ import annotations

from helpers import fake_checkpoint

from zhtrain.training.checkpoints import is_complete, last_complete_checkpoint, list_checkpoints, rotate


def test_only_checkpoints_with_a_matching_manifest_are_complete(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    assert is_complete(good)
    truncated = fake_checkpoint(tmp_path, 4)
    (truncated / "optimizer.pt").write_bytes(b"x" * 10)  # a file cut short after the manifest was written
    missing = fake_checkpoint(tmp_path, 6)
    (missing / "pt_lora_model" / "adapter_model.safetensors").unlink()
    unmarked = fake_checkpoint(tmp_path, 8, complete=False)
    assert [(step, ok) for step, _, ok in list_checkpoints(tmp_path)] == [(2, True), (4, False), (6, False), (8, False)]
    assert not is_complete(unmarked)
    assert last_complete_checkpoint(tmp_path) == good


def test_rotation_keeps_the_newest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)
    removed = rotate(tmp_path, 2, keep=str(tmp_path / "checkpoint-2"))
    assert [p.name for p in removed] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-8"]
