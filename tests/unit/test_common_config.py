"""The typed config: defaults, YAML, environment overrides and errors that name the field."""

from pathlib import Path

import pytest

from services.common import ConfigError, load_config


def test_defaults_give_the_documented_ports_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHPILOT_CONFIG", raising=False)
    config = load_config()
    assert [config.planner.server.port, config.tools.server.port, config.knowledge.server.port] == [50051, 50052, 50053]
    assert config.inference.server.target() == "127.0.0.1:50054"
    assert config.knowledge.store_path == config.data_dir / "knowledge"
    assert config.planner.db_path == config.data_dir / "planner.db"


def test_yaml_then_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "data_dir: /srv/mesh\ninference:\n  server: {port: 6000}\n  dtype: bfloat16\nplanner:\n  max_steps: 3\n"
    )
    monkeypatch.setenv("MESHPILOT_PLANNER__MAX_STEPS", "9")
    config = load_config(path)
    assert config.inference.server.port == 6000
    assert config.inference.dtype == "bfloat16"
    assert config.planner.max_steps == 9
    assert config.planner.db_path == Path("/srv/mesh/planner.db")


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("tools:\n  default_timeout_seconds: 2.5\n")
    monkeypatch.setenv("MESHPILOT_CONFIG", str(path))
    assert load_config().tools.default_timeout_seconds == 2.5


def test_advertised_address_wins_and_wildcard_binds_dial_loopback() -> None:
    config = load_config(None, inference={"server": {"host": "0.0.0.0", "port": 7000}})
    assert config.inference.server.target() == "127.0.0.1:7000"
    config = load_config(None, inference={"server": {"port": 7000, "address": "dns:///inference:7000"}})
    assert config.inference.server.target() == "dns:///inference:7000"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("inference:\n  dtype: int3\n", "inference.dtype"),
        ("planner:\n  max_steps: 0\n", "planner.max_steps"),
        ("knowledge:\n  servr: {}\n", "knowledge.servr"),
        ("- a list\n", "must hold a mapping"),
        ("inference: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_files_name_what_to_change(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(path)


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPILOT_TOOLS__SERVER__PORT", "seventy")
    with pytest.raises(ConfigError, match=r"tools\.server\.port"):
        load_config()


def test_torch_weights_default_to_fp32_and_take_an_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().inference.torch_weights == "fp32"
    # What `benchmarks/inference_bench.py --systems service-torch@torch_weights=int8` sets for the service it starts.
    monkeypatch.setenv("MESHPILOT_INFERENCE__TORCH_WEIGHTS", "int8")
    assert load_config().inference.torch_weights == "int8"


def test_torch_prepack_defaults_on_and_takes_an_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().inference.torch_prepack is True
    # `benchmarks/inference_bench.py --systems service-torch@torch_prepack=false`: the unpacked matmul, side by side.
    monkeypatch.setenv("MESHPILOT_INFERENCE__TORCH_PREPACK", "false")
    assert load_config().inference.torch_prepack is False


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"planner": {"database_url": "mysql://u:hunter2@h/db"}}, "database_url must be a PostgreSQL URL"),
        ({"planner": {"lease_seconds": 0}}, "planner.lease_seconds"),
        (
            {"planner": {"quotas": {"default": {"requests_per_minute": 0}}}},
            "planner.quotas.default.requests_per_minute",
        ),
        ({"auth": {"key_cache_seconds": -1}}, "auth.key_cache_seconds"),
        ({"tools": {"mcp_endpoint": {"path": "no-slash"}}}, "tools.mcp_endpoint.path"),
        ({"tools": {"openapi": [{"name": "Bad", "document": "x.yaml"}]}}, "tools.openapi.0.name"),
        (
            {"tools": {"database_url": "mysql://u:hunter2@h/db"}},
            "tools: Value error, database_url must be a PostgreSQL",
        ),
        ({"edge": {"port": 70000}}, "edge.port"),
        ({"edge": {"max_request_bytes": -1}}, "edge.max_request_bytes"),
        ({"edge": {"request_timeout_seconds": "soon"}}, "edge.request_timeout_seconds"),
        ({"edge": {"hots": "0.0.0.0"}}, "edge.hots"),
        ({"inference": {"discover_seconds": 0}}, "inference.discover_seconds"),
        ({"inference": {"torch_weights": "int4"}}, "inference.torch_weights: Input should be 'fp32', 'bf16' or 'int8'"),
        ({"inference": {"torch_prepack": "maybe"}}, "inference.torch_prepack: Input should be a valid boolean"),
        ({"inference": {"openvino_prompt_lookup_tokens": -1}}, "inference.openvino_prompt_lookup_tokens"),
        ({"inference": {"openvino_prompt_lookup_tokens": "many"}}, "inference.openvino_prompt_lookup_tokens"),
    ],
)
def test_new_settings_refuse_nonsense_naming_the_field(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(**overrides)
    assert needle in str(raised.value)
    assert "hunter2" not in str(raised.value) and len(str(raised.value)) < 600
