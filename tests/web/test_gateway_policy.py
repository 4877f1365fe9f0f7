"""The gateway sends the chat page with the policy the app gives it (the nginx role's default)."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.web import PAGE_CSP

NGINX = Path(__file__).resolve().parents[2] / "roles" / "nginx"


def test_the_gateways_page_policy_is_the_one_the_app_sends() -> None:
    defaults = yaml.safe_load((NGINX / "defaults" / "main.yml").read_text(encoding="utf-8"))
    specs = yaml.safe_load((NGINX / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    assert defaults["nginx_page_csp"] == PAGE_CSP
    assert specs["argument_specs"]["main"]["options"]["nginx_page_csp"]["default"] == PAGE_CSP
