"""The command line made from the config dataclasses (flowserve/config.py: `flag`,
`add_flags`): the flags and their defaults, one per setting, and the cluster a set of flags
gives (no server)."""
import re
import socket

import pytest

import deepflow
from deepflow import ServeConfig
from flowserve.config import EngineConfig, from_args


def configs(*flags: str) -> tuple[ServeConfig, EngineConfig]:
    args = deepflow.parser().parse_args(["serve", *flags])
    return from_args(ServeConfig, args), from_args(EngineConfig, args)


def shape(*flags: str) -> dict[str, tuple[int, EngineConfig]]:
    return deepflow.cluster_shape(*configs(*flags))


def test_flags_carry_the_dataclass_defaults():
    serve, engine = configs()
    assert engine == EngineConfig() and engine.kv_cache_gb == 1.0  # one default, where the docs say
    assert (serve.host, serve.port, serve.num_tes, serve.place_timeout_s) == ("127.0.0.1", 8000, None, 60.0)
    serve, engine = configs("--kv-cache-gb", "0.25", "--no-async-scheduling", "--policy", "rr",
                            "--host", "0.0.0.0", "--place-timeout-s", "5")
    assert (engine.kv_cache_gb, engine.async_scheduling, serve.policy, serve.place_timeout_s) == (0.25, False, "rr", 5)
    assert engine == EngineConfig(kv_cache_gb=0.25, async_scheduling=False)  # --host is HTTP's, not a TE's
    with pytest.raises(SystemExit):
        configs("--policy", "random")
    gen = deepflow.parser().parse_args(["generate", "--prompt", "hi", "--threads", "2"])
    assert from_args(EngineConfig, gen).num_threads == 2 and gen.max_tokens == 256 and gen.temperature == 0.0


def test_pd_flags_alone_make_a_pd_only_cluster(tmp_path, monkeypatch):
    """`--prefill-tes 1 --decode-tes 1` needs no heatmap: without --num-tes there is no
    colocated TE to choose against. With one, the refusal names the cause and the fixes."""
    monkeypatch.setenv("DEEPFLOW_CACHE", str(tmp_path))  # no saved heatmap
    cfg, engine = configs("--prefill-tes", "1", "--decode-tes", "1")
    pd_only = deepflow.cluster_shape(cfg, engine)
    assert {g: n for g, (n, _) in pd_only.items()} == {"colocated": 0, "prefill": 1, "decode": 1}
    assert deepflow.load_heatmap(cfg, pd_only) is None
    assert {g: n for g, (n, _) in shape().items()} == {"colocated": 1, "prefill": 0, "decode": 0}

    cfg, engine = configs("--num-tes", "1", "--prefill-tes", "1", "--decode-tes", "1")
    with pytest.raises(SystemExit) as e:
        deepflow.load_heatmap(cfg, deepflow.cluster_shape(cfg, engine))
    assert all(s in str(e.value) for s in ("both colocated TEs", "--num-tes", "profile-pd", "--pd-heatmap"))


def test_a_missing_model_path_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="no model at .*nope"):
        deepflow.base_models(configs("--model", "a=" + str(tmp_path / "nope"))[0])
    with pytest.raises(SystemExit, match="no model at .*nope"):
        deepflow.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])


def test_profile_pd_show_without_a_heatmap_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match="run `python deepflow.py profile-pd` first"):
        deepflow.main(["profile-pd", "--show", "--out", str(tmp_path / "none.json")])


def test_serve_on_a_port_in_use_stops_before_starting_anything(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot serve on 127.0.0.1:{port}: Address already in use"):
            deepflow.main(["serve", "--port", str(port), "--state-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # the state dir untouched


@pytest.mark.parametrize("text,words", [(None, "No such file"), ("[colocated", "Expected ']'"),
                                        ("[colocated]\ninstances = -1", "instances must be a whole number"),
                                        ("[decode]\ninstances = \"2\"", "instances must be a whole number"),
                                        ("[colocated]\nkv_cache_gb = \"x\"", "kv_cache_gb must be float, not 'x'"),
                                        ("[colocated]\nmax_num_seqs = 2.5", "max_num_seqs must be int"),
                                        ("[colocated]\ncpu_kernels = 1", "cpu_kernels must be bool"),
                                        ("[colocated]\ndevice = \"tpu\"", "device must be auto | cpu | cuda | npu")])
def test_a_bad_cluster_file_is_a_message_not_a_traceback(tmp_path, text, words):
    path = tmp_path / "cluster.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match=re.escape(words)):
        shape("--cluster", str(path))
