import torch

from placement_compile.model import DenoiserInputs, load_model
from placement_compile.synthetic import generate_circuit
from placement_compile.train import TrainConfig, train, validation_loss
from tests.placement.helpers import tiny_graph

CFG = TrainConfig(steps=20, batch=8, lr=1e-3, warmup=5, val_every=1000, ckpt_every=1000)


def test_training_lowers_loss_on_a_fixed_batch(tmp_path):
    circuit = generate_circuit(0, "v1")
    fixed = [(DenoiserInputs.from_graph(circuit), circuit.positions)]
    torch.manual_seed(0)
    train([circuit], [], tmp_path, TrainConfig(**{**CFG.__dict__, "steps": 0}), progress=False)
    before = validation_loss(load_model(str(tmp_path / "model.pt")), fixed, batch=CFG.val_batch)
    summary = train([circuit], [circuit], tmp_path, CFG, resume=True, progress=False)
    after = validation_loss(load_model(str(tmp_path / "model.pt")), fixed, batch=CFG.val_batch)
    print(f"fixed-batch eps MSE: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    assert summary["step"] == 20 and summary["val_loss"] == after
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resume_equals_uninterrupted(tmp_path):
    graphs = [tiny_graph(seed=i) for i in range(3)]
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 8, "ckpt_every": 4})
    train(graphs, [], tmp_path / "straight", cfg, progress=False)
    train(graphs, [], tmp_path / "split", TrainConfig(**{**cfg.__dict__, "steps": 4}), progress=False)
    train(graphs, [], tmp_path / "split", cfg, resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # load_model reads a training checkpoint (last.pt) as well as model.pt
    from_last, from_model = load_model(str(tmp_path / "split" / "last.pt")), load_model(str(tmp_path / "split" / "model.pt"))
    for key, value in from_last.state_dict().items():
        assert torch.equal(value, from_model.state_dict()[key]), key
