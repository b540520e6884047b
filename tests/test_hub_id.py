"""A Hub id goes through snapshot_download (served from the local cache here, as offline users get it)."""

from huggingface_hub import ModelCard

from conftest import publish_to_hf_cache, read_report, run_cli

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_hub_id_resolves_revision_and_names_base_model(timm_backdoor, tmp_path):
    publish_to_hf_cache(timm_backdoor["model"], "backdoor-lab/digits-resnet18", SHA)
    out = tmp_path / "o"
    code = run_cli("backdoor-lab/digits-resnet18", "--data", timm_backdoor["data"], "--output", out, "--quiet",
                   "--max-rounds", "3", "--max-epochs", "2", "--eval-limit", "40")
    assert code == 0
    report = read_report(out)
    assert report["source"] == {**report["source"], "model": "backdoor-lab/digits-resnet18", "revision": SHA}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "backdoor-lab/digits-resnet18"
    assert (out / "config.json").read_bytes() == (timm_backdoor["model"] / "config.json").read_bytes()


def test_default_output_folder_is_named_after_the_model(timm_backdoor, tmp_path, monkeypatch):
    publish_to_hf_cache(timm_backdoor["model"], "backdoor-lab/digits-resnet18", SHA)
    monkeypatch.chdir(tmp_path)
    assert run_cli("backdoor-lab/digits-resnet18", "--data", timm_backdoor["data"], "--quiet",
                   "--max-rounds", "1", "--max-epochs", "1", "--eval-limit", "20") == 0
    assert (tmp_path / "digits-resnet18-gradprune" / "model.safetensors").is_file()
