import pytest

from ops.config import load_config
from ops.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_are_the_embedded_stack():
    cfg = load_config(env={})
    assert cfg.kafka.is_embedded
    assert cfg.kafka.events_partitions >= 4
    assert cfg.feast.online_store.type == "sqlite"


def test_yaml_then_environment_override_in_that_order(tmp_path):
    file = tmp_path / "plum.yaml"
    file.write_text("kafka:\n  bootstrap_servers: k1:9092,k2:9092\n  events_partitions: 6\n"
                    "feast:\n  online_store:\n    type: redis\n    connection_string: redis:6379\n")
    cfg = load_config(file, env={"PLUM_KAFKA__EVENTS_PARTITIONS": "12"})
    assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert not cfg.kafka.is_embedded
    assert cfg.kafka.events_partitions == 12
    assert cfg.feast.online_store.type == "redis"
    assert cfg.feast.online_store.connection_string == "redis:6379"


def test_config_file_from_environment_variable(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("pipeline:\n  poll_max_records: 77\n")
    assert load_config(env={"PLUM_CONFIG": str(file)}).pipeline.poll_max_records == 77


@pytest.mark.parametrize("text, fragment", [
    ("kafka:\n  events_partitions: 0\n", "kafka.events_partitions"),
    ("kafka:\n  bootstrap: x\n", "kafka.bootstrap"),
    ("- a list\n", "mapping"),
    ("kafka: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_one_clear_sentence(tmp_path, text, fragment):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(file, env={})


def test_missing_config_file_is_reported():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/plum.yaml", env={})


def test_an_unknown_key_names_where_it_was_set_and_what_the_section_takes(tmp_path):
    file = tmp_path / "plum.yaml"
    file.write_text("serving:\n  beam_widht: 4\n")
    with pytest.raises(ConfigError, match=r"serving.beam_widht: unknown key \(set in config file .*plum.yaml\);"
                                          r" serving takes .*beam_width") as caught:
        load_config(file, env={})
    assert "Traceback" not in str(caught.value)
    with pytest.raises(ConfigError, match="set in the environment variable PLUM_SERVING__BEAM_WIDHT"):
        load_config(env={"PLUM_SERVING__BEAM_WIDHT": "4"})


def test_the_rqvae_section_is_typed_and_keeps_left_out_keys_unset(tmp_path):
    file = tmp_path / "plum.yaml"
    file.write_text("tokenizer:\n  rqvae:\n    latent_dim: 16\n    codebook_sizes: [64, 32]\n")
    rqvae = load_config(file, env={}).tokenizer.rqvae
    assert rqvae == {"latent_dim": 16, "codebook_sizes": (64, 32)}  # no defaults filled in
    file.write_text("tokenizer:\n  rqvae:\n    latent_dims: 16\n")
    with pytest.raises(ConfigError, match="tokenizer.rqvae.latent_dims: unknown key.*takes .*latent_dim"):
        load_config(file, env={})
    file.write_text("tokenizer:\n  rqvae:\n    codebook_sizes: [1]\n")
    with pytest.raises(ConfigError, match="tokenizer.rqvae.codebook_sizes.0"):
        load_config(file, env={})
