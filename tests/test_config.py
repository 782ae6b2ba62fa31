import json

import pytest
import torch

import vqvae2

LATENT_SHAPES = {
    "smoke": [(4, 4), (8, 8)],
    "fashion-mnist": [(8, 8), (16, 16)],
    "fashion-mnist-gpu": [(8, 8), (16, 16)],
    "imagenet-256": [(32, 32), (64, 64)],
    "ffhq-1024": [(32, 32), (64, 64), (128, 128)],
}


@pytest.mark.parametrize("name", LATENT_SHAPES)
def test_every_preset_builds_and_encodes_to_its_latent_shapes(name):
    config = vqvae2.preset(name)
    assert config.latent_shapes() == LATENT_SHAPES[name]
    # Paper-scale models on the meta device: real modules and shapes, no memory.
    with torch.device("meta"):
        autoencoder = vqvae2.build_autoencoder(config).eval()
        priors = vqvae2.build_priors(config)
        x = torch.zeros(2, config.image_channels, config.image_size, config.image_size)
        codes = autoencoder.encode(x)
        assert [tuple(c.shape[1:]) for c in codes] == LATENT_SHAPES[name]
        assert autoencoder.decode_codes(codes).shape == x.shape
        labels = torch.zeros(2, dtype=torch.long)
        for level, prior in enumerate(priors):
            logits = prior(codes[level], codes[:level] or None, labels if prior.num_classes else None)
            assert logits.shape == (2, config.autoencoder.codebook_size, *LATENT_SHAPES[name][level])
        if config.num_classes:
            assert vqvae2.build_classifier(config)(x).shape == (2, config.num_classes)


def test_paper_scale_imagenet_widths():
    config = vqvae2.preset("imagenet-256")
    assert (config.autoencoder.codebook_size, config.autoencoder.embed_dim) == (512, 64)
    assert config.priors[0].attention_layers > 0 and config.priors[1].attention_layers == 0
    assert config.priors[0].channels == 512 and config.priors[1].cond_res_blocks == 20


def test_overrides_by_dotted_path_and_by_nesting_are_equivalent():
    a = vqvae2.preset("smoke", {"autoencoder.channels": 64, "priors.1.layers": 5, "train_prior.lr": "0.001"})
    b = vqvae2.preset("smoke", {"autoencoder": {"channels": 64}, "priors.1": {"layers": 5}, "train_prior": {"lr": 1e-3}})
    assert a == b
    assert a.autoencoder.channels == 64 and a.priors[1].layers == 5 and a.train_prior.lr == 1e-3
    assert a.priors[0] == vqvae2.preset("smoke").priors[0]


def test_config_round_trips_through_a_plain_dict():
    config = vqvae2.preset("ffhq-1024")
    again = vqvae2.config_from_dict(vqvae2.ModelConfig, vqvae2.config_to_dict(config))
    assert again == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"autoencoder.chanels": 64}, "unknown field 'chanels'"),
        ({"priors.2.layers": 3}, "index '2' is not one of 0..1"),
        ({"autoencoder.channels": "wide"}, "autoencoder.channels must be an integer"),
        ({"autoencoder.strides": [3, 2]}, "powers of two"),
        ({"autoencoder.strides": [2, 2, 2]}, "priors has 2 entries but the autoencoder has 3 levels"),
        ({"image_size": 18}, "image_size 18 must be divisible"),
        ({"priors.0.attention_heads": 3}, "divisible by prior.attention_heads"),
        ({"train_prior.amp": "fp8"}, "train.amp must be"),
        ({"train_prior.micro_batch_size": 0},
         r"train.micro_batch_size must be between 1 and train.batch_size \(32\), got 0"),
        ({"train_autoencoder.micro_batch_size": 33},
         r"between 1 and train.batch_size \(32\), got 33: .* raise train.batch_size"),
        ({"train_prior.micro_batch_size": "four"}, "train_prior.micro_batch_size must be an integer"),
        ({"train_prior.activation_checkpointing": "maybe"},
         "train_prior.activation_checkpointing must be true or false"),
    ],
)
def test_bad_overrides_fail_with_a_message_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        vqvae2.preset("smoke", overrides)


def test_micro_batches_and_activation_checkpointing_are_set_by_override_and_round_trip():
    overrides = {"train_prior.micro_batch_size": "8", "train_prior.activation_checkpointing": "true"}
    config = vqvae2.preset("smoke", overrides)
    assert config.train_prior.micro_batch_size == 8 and config.train_prior.activation_checkpointing is True
    assert config.train_autoencoder.micro_batch_size is None  # the default: the whole batch at once
    assert vqvae2.config_from_dict(vqvae2.ModelConfig, vqvae2.config_to_dict(config)) == config
    back = vqvae2.preset("smoke", {"train_prior.micro_batch_size": None})
    assert back.train_prior.micro_batch_size is None


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="smoke, fashion-mnist, fashion-mnist-gpu, imagenet-256, ffhq-1024"):
        vqvae2.preset("cifar")


@pytest.mark.parametrize("section, options, field", [
    ("storage", {"endpoint_url": "http://minio:9000", "secret": "s3kr1t-value"}, "storage.storage_options"),
    ("storage", {"client_kwargs": {"aws_secret_access_key": "s3kr1t-value"}}, "storage.storage_options.client_kwargs"),
    ("source", {"token": "s3kr1t-value"}, "source.storage_options"),
])
def test_a_credential_in_the_config_is_refused_without_being_repeated(section, options, field):
    from tasks.config import pipeline_config

    sections = {"storage": {"root": "s3://bucket/runs"}, "source": {"url": "s3://bucket/images"}}
    sections[section] = {**sections[section], "storage_options": options}
    with pytest.raises(ValueError) as error:
        pipeline_config("smoke", **sections)
    message = str(error.value)
    assert f"{field} holds" in message and f"set {section}.credentials_block to its name" in message
    assert "s3kr1t-value" not in message  # the error never echoes the input


def test_a_missing_credentials_block_is_named(prefect_api):
    from tasks.config import Runtime, pipeline_config

    config = pipeline_config("smoke", storage={"root": "s3://bucket/runs", "credentials_block": "no-such-block"})
    with pytest.raises(ValueError, match="storage.credentials_block is 'no-such-block', but there is no Secret block"):
        Runtime.of(config)


def test_a_credentials_block_holding_a_dict_is_refused_and_json_text_is_read(prefect_api):
    import json
    from uuid import uuid4

    from prefect.blocks.system import Secret

    from tasks.config import Runtime, pipeline_config

    options = {"key": "k", "secret": "s3kr1t-value", "endpoint_url": "http://minio:9000"}
    as_dict, as_text = f"dict-{uuid4().hex[:8]}", f"text-{uuid4().hex[:8]}"
    Secret(value=options).save(as_dict)  # Prefect's API returns a dict value in clear
    Secret(value=json.dumps(options)).save(as_text)
    config = pipeline_config("smoke", storage={"root": "s3://bucket/runs", "credentials_block": as_dict,
                                               "storage_options": {"anon": False}})
    with pytest.raises(ValueError, match=f"the Secret block '{as_dict}' holds a dict, which Prefect's API and UI "
                                         "show in clear; save the same options as JSON text"):
        Runtime.of(config)
    runtime = Runtime.of(config.model_copy(update={"storage": config.storage.model_copy(
        update={"credentials_block": as_text})}))
    assert runtime.storage_options == {"anon": False, **options}
    assert "s3kr1t-value" not in repr(runtime)


def test_test_only_fields_are_not_in_the_run_form_but_still_apply():
    from flows.pipeline import vqvae2_pipeline
    from tasks.config import pipeline_config

    def properties(schema):
        if isinstance(schema, dict):
            for name, value in schema.items():
                if name == "properties":
                    yield from value
                yield from properties(value)
        elif isinstance(schema, list):
            for value in schema:
                yield from properties(value)

    form = vqvae2_pipeline.parameters.model_dump()  # what Prefect's UI renders as the run form
    assert "checkpoint_every" in set(properties(form))
    assert "fail_once_at_step" not in set(properties(form))
    assert "fail_once_at_step" not in json.dumps(form)  # nor in the defaults the form is filled with
    config = pipeline_config("smoke", training={"fail_once_at_step": {"autoencoder": 3}})
    assert config.training.fail_once_at_step == {"autoencoder": 3}


def test_the_cli_knows_the_presets_and_sections_without_importing_the_config():
    """The CLI's parser and `tasks.setting_forms` name them without torch or pydantic: the same ones."""
    import typing

    import vqvae2
    from flows.cli import parser
    from tasks.config import PipelineConfig, PresetName
    from tasks.setting_forms import SECTIONS

    preset = next(a for a in parser()._subparsers._group_actions[0].choices["run"]._actions if a.dest == "preset")
    assert tuple(preset.choices) == typing.get_args(PresetName) and set(preset.choices) == set(vqvae2.PRESETS)
    assert SECTIONS == tuple(name for name in PipelineConfig.model_fields if name not in ("preset", "overrides"))


@pytest.mark.parametrize("overrides, from_data, fixed", [
    ({}, False, False),  # the default: the preset's classes when the data has them, else the data's
    ({"num_classes": "auto"}, True, False),
    ({"num_classes": 3}, False, True),
    ({"num_classes": 0}, False, True),  # unconditional, whatever the data
])
def test_the_number_of_classes_follows_the_data_unless_it_is_a_number(overrides, from_data, fixed):
    from tasks.config import pipeline_config

    config = pipeline_config("smoke", overrides=overrides)
    assert (config.classes_from_data, config.classes_fixed) == (from_data, fixed)
    assert config.model.num_classes == overrides.get("num_classes", 10) if fixed else config.model.num_classes == 10
    assert config.with_classes(4).model.num_classes == 4 and config.with_classes(4).classes_fixed


@pytest.mark.parametrize("key, value, cli, parameters", [
    ("ingest.max_bad_fraction", 0.05, "--set ingest.max_bad_fraction=0.05", '{"ingest": {"max_bad_fraction": 0.05}}'),
    ("num_classes", "auto", "--set num_classes=auto", '{"overrides": {"num_classes": "auto"}}'),
    ("training.subprocess", False, "--set training.subprocess=false", '{"training": {"subprocess": false}}'),
    ("storage.storage_options", {"endpoint_url": "http://minio:9000"},
     '--set storage.storage_options={"endpoint_url": "http://minio:9000"}',
     '{"storage": {"storage_options": {"endpoint_url": "http://minio:9000"}}}'),
])
def test_a_setting_is_named_as_the_cli_and_a_deployment_take_it(key, value, cli, parameters):
    from tasks.config import validate_config
    from tasks.setting_forms import Setting, parse_value

    setting = Setting(key, value)
    assert (setting.shown("cli"), setting.shown("parameters")) == (cli, parameters)
    # Each form reads back as the same config: what the CLI's --set makes, what a run's parameters make.
    text = cli.removeprefix("--set ").partition("=")[2]
    section, _, field = key.partition(".")
    by_option = {section: {field: parse_value(text)}} if field else {"overrides": {key: parse_value(text)}}
    assert validate_config(by_option) == validate_config(json.loads(parameters))


def test_tensorboard_without_the_package_is_refused_with_the_config(monkeypatch):
    """Before anything runs, not when the first training starts an hour later."""
    import sys

    from tasks.config import pipeline_config

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec finds nothing
    with pytest.raises(ValueError, match=r"training.tensorboard is true, but tensorboard is not installed on this "
                                         r"machine: pip install 'vqvae2\[tensorboard\]'"):
        pipeline_config("smoke", training={"tensorboard": True})
    assert not pipeline_config("smoke").training.tensorboard
