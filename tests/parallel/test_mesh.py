"""ParallelDims arithmetic and validation (no process group needed)."""

from types import SimpleNamespace

import pytest

from moetron.model import ModelConfig
from moetron.parallel.mesh import ParallelConfigError, ParallelDims, ParallelMesh


def par(dp=-1, tp=1, pp=1, cp=1, ep=1):
    return SimpleNamespace(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)


def test_dp_is_inferred_from_world_size():
    assert ParallelDims.from_config(par(), 8).dp == 8
    assert ParallelDims.from_config(par(tp=2, pp=2), 8).dp == 2
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by tp\*pp\*cp=4"):
        ParallelDims.from_config(par(tp=2, pp=2), 6)
    with pytest.raises(ParallelConfigError, match="must equal the world size 8"):
        ParallelDims.from_config(par(dp=2, tp=2), 8)


@pytest.mark.parametrize(
    "dims,message",
    [
        (ParallelDims(dp=1, tp=3), r"tp=3 must divide model.n_heads=4"),
        (ParallelDims(dp=4, ep=3), r"ep=3 must divide model.n_routed_experts=4"),
        (ParallelDims(dp=1, ep=2), r"ep=2 must divide dp\*cp=1"),
        (ParallelDims(dp=1, pp=3), r"pp=3 exceeds model.n_layers=2"),
        (ParallelDims(dp=1, tp=2), r"tp=2: only data parallelism is implemented"),
    ],
)
def test_validation_against_the_model(dims, message):
    with pytest.raises(ParallelConfigError, match=message):
        dims.validate(ModelConfig.from_preset("tiny"))


def test_single_process_mesh():
    mesh = ParallelMesh(ParallelDims(dp=1), "cpu")
    assert not mesh.distributed and mesh.dp_rank == 0 and mesh.dp_size == 1
    assert mesh.seed(5) == 5 and mesh.group("dp") is None
    with pytest.raises(ParallelConfigError, match="needs 2 processes"):
        ParallelMesh(ParallelDims(dp=2), "cpu")
