"""The `gateway.alerts` section: where alerts go, the per-model window and the check period.
Beside the alert code that reads it; `GatewayConfig` only nests it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from serve_app.config_base import StrictConfig


class AlertTarget(StrictConfig):
    """Where alerts go: a generic JSON webhook, or any Apprise URL (slack://, msteams://,
    dingtalk://, feishu://, wecombot://, mailto://, ... see the Apprise wiki)."""

    kind: Literal["webhook", "apprise"] = Field("webhook", description="webhook: POST the alert as JSON to `url`")
    url: str = Field(min_length=1, description="the webhook URL, or the Apprise URL (it may hold a token: keep the "
                     "config private)")

    @model_validator(mode="after")
    def _url_shape(self) -> "AlertTarget":
        if self.kind == "webhook" and not re.match(r"^https?://\S+$", self.url):
            raise ValueError("url: a webhook target needs an http:// or https:// URL")
        if self.kind == "apprise" and "://" not in self.url:
            raise ValueError("url: an apprise target needs a scheme://... URL (slack://, mailto://, ...)")
        return self


class AlertsConfig(StrictConfig):
    """Alerts the app's status board pushes when a replica dies, stalls or fails its deep health,
    a model has no ready replica or its circuit opens, a node leaves, or an autoscaler sits at
    max_replicas with every replica full, and again when each recovers."""

    targets: list[AlertTarget] = Field(default_factory=list, description="no targets: no alerts are sent")
    window_s: float = Field(
        300.0, ge=0, description="per model (or node): at most one alert and one recovery in this window; "
        "incidents in between are folded into the next message"
    )
    check_period_s: float = Field(2.0, gt=0, le=60, description="how often the board compares Serve's view with "
                                  "the replicas' reports and the live nodes")
    timeout_s: float = Field(5.0, gt=0, le=60, description="per delivery attempt; failures are logged and counted, "
                             "never retried into a storm")
    at_max_sustain_s: float = Field(
        30.0, ge=0, description="a model at max_replicas with every replica full for this long is an alert "
        "(a shorter burst is not); Serve's default autoscaling look-back is also 30 s"
    )
