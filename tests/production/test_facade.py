"""The production package's facade and settings: the exported names are pinned, and a mistyped setting is an
error naming the file and the field, never a silent default."""

from __future__ import annotations

import json

import pytest
from citycard.apps import production
from citycard.apps.production import PhotoSpec, ProductionError, load_production_settings


def test_the_facade_exports_exactly_these_names() -> None:
    assert sorted(production.__all__) == sorted([
        "INITIAL_PIN", "PRINT_COLUMNS", "Batch", "BatchRow", "BatchSummary", "CreateResult", "DistributionResult",
        "EntryState", "HeldBack", "ImportRecord", "ImportResult", "PersonalizeResult", "PhotoImportResult",
        "PhotoProblem", "PhotoSpec", "PrintExport", "PrintedResult", "ProductionError", "ProductionSettings",
        "ProductionStore", "ReviewResult", "RosterEntry", "RowProblem", "RowState", "activate", "activate_financial",
        "batch_summary", "card_profile", "convert_photo", "create_batches", "default_jobs", "distribute_to_employer",
        "export_print",
        "export_review", "hand_over", "import_photos", "import_review", "import_roster", "load_production_settings",
        "missing_photos", "open_chip", "personalize_batch", "register_printed"])
    assert all(hasattr(production, name) for name in production.__all__)


def test_settings_default_and_from_the_file(tmp_path) -> None:
    defaults = load_production_settings(tmp_path)
    assert defaults.photo == PhotoSpec() and defaults.init_org == "370100" + "0" * 17 + "1"
    (tmp_path / "citycard.json").write_text(json.dumps({"registry": {"issuer_region_code": "330100"}, "production": {
        "issuing_organisation": "杭州市人力资源和社会保障局", "batch_rows_max": 500, "master_keys": "keys/issuer.json",
        "photo": {"width": 390, "height": 567}}}), encoding="utf-8")
    settings = load_production_settings(tmp_path)
    assert settings.batch_rows_max == 500 and settings.photo.width == 390
    assert settings.master_keys == tmp_path / "keys" / "issuer.json"
    assert settings.purse_issuer_id.startswith("330100")


@pytest.mark.parametrize(("section", "field"), [
    ({"batch_size": 10}, "production.batch_size"),
    ({"batch_rows_max": 5000}, "production.batch_rows_max"),
    ({"init_org": "XYZ"}, "production.init_org"),
    ({"photo": {"width": 10}}, "production.photo.width"),
    ({"issuing_organisation": "\u2603 office"}, "production.issuing_organisation"),
])
def test_a_mistyped_setting_names_the_file_and_the_field(tmp_path, section, field) -> None:
    (tmp_path / "citycard.json").write_text(json.dumps({"production": section}), encoding="utf-8")
    with pytest.raises(ProductionError) as refused:
        load_production_settings(tmp_path)
    assert refused.value.field == field and "citycard.json" in str(refused.value)
