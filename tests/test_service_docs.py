"""docs/service.md and the README stay true: their settings tables are the Settings class; every problem type
and every route of the app is documented."""

from pathlib import Path

import pytest

from service.problems import CATALOG
from service.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "service.md").read_text()


@pytest.mark.parametrize("page", ["docs/service.md", "README.md"])
def test_settings_table_matches_the_settings_class(page):
    text = (ROOT / page).read_text()
    block = text.split("<!-- settings-table:start -->\n")[1].split("<!-- settings-table:end -->")[0]
    assert block.strip() == settings_table().strip()


def test_every_problem_type_is_documented():
    for slug, (status, _, text) in CATALOG.items():
        assert f"| `{slug}` | {status} | {text} |" in DOC, slug


def test_every_route_is_documented():
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(_env_file=None, model_store="/nonexistent", data_dir="/nonexistent"))
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith(("/v1", "/healthz", "/readyz", "/metrics")):
            for method in route.methods - {"HEAD"}:
                assert f"`{method} {path}" in DOC, f"{method} {path}"
