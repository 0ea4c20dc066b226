"""Mesh construction and the parameter / batch sharding rule, on 8 simulated CPU devices."""

import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec

from perflow_jax import sharding
from tests.helpers.processes import run_joined_processes, run_with_devices


@pytest.mark.parametrize(
    "shape, fsdp, expected",
    [
        ((320, 4, 3, 3), 4, PartitionSpec("fsdp", None, None, None)),  # largest dim divisible
        ((3, 3, 4, 322), 4, PartitionSpec(None, None, "fsdp", None)),  # 322 is not, 4 is
        ((77, 5), 4, PartitionSpec()),  # none divisible: replicated
        ((640, 640), 8, PartitionSpec("fsdp", None)),  # ties: the first
        ((1280,), 1, PartitionSpec()),  # no fsdp axis: replicated
    ],
)
def test_parameter_is_split_on_its_largest_dimension_that_fsdp_divides(shape, fsdp, expected):
    assert sharding.parameter_spec(shape, fsdp) == expected


def test_mesh_fills_minus_one_and_names_the_axes():
    out = run_with_devices(
        """
        from perflow_jax import sharding
        for shape in ((-1, 1), (4, -1), (1, 8), (2, 4)):
            mesh = sharding.make_mesh(shape)
            print(dict(mesh.shape))
        """
    )
    assert out.splitlines() == [
        "{'data': 8, 'fsdp': 1}",
        "{'data': 4, 'fsdp': 2}",
        "{'data': 1, 'fsdp': 8}",
        "{'data': 2, 'fsdp': 4}",
    ]


@pytest.mark.parametrize(
    "shape, message",
    [((3, 3), "holds 9 devices but there are 1"), ((-1, -1), "at most one size"), ((1, 2, 3), "give two sizes")],
)
def test_bad_mesh_shapes_are_explained(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape, jax.devices()[:1])


def test_parameters_and_batches_are_placed_by_the_rule():
    out = run_with_devices(
        """
        import jax, jax.numpy as jnp, numpy as np
        from perflow_jax import sharding
        mesh = sharding.make_mesh((2, 4))
        params = {"conv": {"kernel": jnp.ones((3, 3, 4, 320))}, "norm": {"scale": jnp.ones((77,))}}
        placed = jax.device_put(params, sharding.parameter_shardings(params, mesh))
        kernel = placed["conv"]["kernel"]
        print(kernel.sharding.spec, kernel.addressable_shards[0].data.shape)
        print(placed["norm"]["scale"].sharding.spec, placed["norm"]["scale"].addressable_shards[0].data.shape)
        batch = jax.device_put(np.arange(16.0).reshape(16, 1), sharding.batch_sharding(mesh))
        print(sorted(float(s.data[0, 0]) for s in batch.addressable_shards))
        """
    )
    lines = out.splitlines()
    assert lines[0] == "P(None, None, None, 'fsdp') (3, 3, 4, 80)"
    assert lines[1] == "P() (77,)"
    assert lines[2] == str([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0])  # 2 examples per device


def test_global_batch_splits_the_batch_over_data_and_fsdp_devices():
    out = run_with_devices(
        """
        import numpy as np
        from perflow_jax import sharding

        mesh = sharding.make_mesh((4, 2))
        local = {
            "mean": np.arange(16 * 2 * 2 * 4, dtype=np.float16).reshape(16, 2, 2, 4),
            "input_ids": np.arange(16 * 77, dtype=np.int32).reshape(16, 77),
        }
        batch = sharding.global_batch(local, mesh)
        device_position = {d: i for i, d in enumerate(mesh.devices.flat)}  # 'data' major, then 'fsdp'
        for name, value in batch.items():
            assert value.shape == local[name].shape and value.dtype == local[name].dtype, name
            np.testing.assert_array_equal(np.asarray(value), local[name])
            assert len(value.addressable_shards) == 8
            for shard in value.addressable_shards:
                k = 2 * device_position[shard.device]
                assert shard.index[0] == slice(k, k + 2), (name, shard.index)
                np.testing.assert_array_equal(np.asarray(shard.data), local[name][k : k + 2])
        print("ok")
        """,
        env={"JAX_PLATFORMS": "cpu"},
    )
    assert out.strip() == "ok"


def test_two_processes_join_through_the_environment_variables():
    code = """
        import jax, numpy as np
        from perflow_jax import sharding
        sharding.initialize_distributed()
        mesh = sharding.make_mesh((-1, 1))
        local = np.full((2, 1), float(jax.process_index()))
        total = jax.jit(lambda x: x.sum())(jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local))
        print(jax.process_count(), jax.device_count(), float(total))
        """
    outputs = run_joined_processes(
        [sys.executable, "-c", textwrap.dedent(code)],
        2,
        timeout=120,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    for out in outputs:
        # 2 processes x 2 devices; the global batch holds process 0's zeros and process 1's ones.
        assert out.strip().splitlines()[-1] == "2 4 2.0"


def test_half_set_environment_is_refused(monkeypatch):
    monkeypatch.setenv(sharding.COORDINATOR_ENV, "127.0.0.1:1234")
    monkeypatch.delenv(sharding.NUM_PROCESSES_ENV, raising=False)
    with pytest.raises(ValueError, match="PERFLOW_NUM_PROCESSES, PERFLOW_PROCESS_ID not"):
        sharding.initialize_distributed()
