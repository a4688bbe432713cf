"""The error taxonomy: each kind carries status, code and metric reason; the metric's labels and the
API's task list come from one definition each."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from model.variants import TASKS
from service import errors
from service.app import create_app
from service.metrics import Metrics
from service.middleware import RequestContext
from tests.live_server import metric_value
from tests.service.conftest import fake_models, test_settings

# The API's contract, as clients, dashboards and alerts know it: code -> (status, reason label or None).
CONTRACT = {
    "bad_input": (400, "bad_input"),
    "unauthorized": (401, "unauthorized"),
    "unknown_task": (404, None),
    "not_acceptable": (406, "unsupported"),
    "too_large": (413, "too_large"),
    "unsupported": (415, "unsupported"),
    "upload_timeout": (408, "upload_timeout"),
    "invalid_request": (422, None),
    "queue_full": (429, "queue_full"),
    "uploads_busy": (429, "uploads_busy"),
    "disconnected": (499, "disconnected"),
    "internal_error": (500, None),
    "inference_failed": (500, None),
    "not_ready": (503, "not_ready"),
    "draining": (503, "draining"),
    "out_of_memory": (503, "oom"),
    "deadline": (504, "deadline"),
}


def test_every_error_kind_carries_the_status_code_and_reason_of_the_contract():
    assert {k.code: (k.status, k.reason) for k in errors.ERRORS} == CONTRACT
    assert len({k.code for k in errors.ERRORS}) == len(errors.ERRORS)  # one class per code


def test_the_metric_reasons_are_derived_from_the_error_kinds():
    expected = {"queue_full", "uploads_busy", "deadline", "disconnected", "draining", "not_ready", "too_large", "oom",
                "bad_input", "unsupported", "unauthorized", "upload_timeout"}
    assert set(errors.REJECT_REASONS) == expected and len(errors.REJECT_REASONS) == len(expected)
    metrics = Metrics(("deblur",))
    metrics.reject("deblur", errors.OutOfMemory("no room"))
    metrics.reject("deblur", errors.InferenceFailed())  # not a refusal: no reason, not counted
    metrics.reject("dehaze", errors.BadInput("x"))  # a task not served counts as "unknown"
    text = generate_latest(metrics.registry).decode()
    for reason in expected:  # every series exists from the start
        assert f'mprnet_rejected_total{{reason="{reason}",task="deblur"}}' in text
        counted = metric_value(text, "mprnet_rejected_total", task="deblur", reason=reason)
        assert counted == (1 if reason == "oom" else 0)
    assert metric_value(text, "mprnet_rejected_total", task="unknown", reason="bad_input") == 1


def test_a_bare_service_error_is_refused_and_kinds_answer_in_the_json_shape():
    with pytest.raises(TypeError):
        errors.ServiceError("which status?")
    response = errors.QueueFull("The queue is full; retry later.", wait_s=2.2).response()
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    assert json.loads(response.body) == {"detail": "The queue is full; retry later.", "code": "queue_full"}
    assert errors.NotReady("warming").headers == {"Retry-After": "5"}
    assert errors.Unauthorized().headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.anyio
async def test_the_middleware_answers_an_escaped_error_with_the_one_500_body():
    async def broken(scope, receive, send):
        raise ZeroDivisionError("a bug")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"x-request-id", b"rid-9")]}
    await RequestContext(broken, Metrics(("deblur",)))(scope, None, send)
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == errors.InternalError("rid-9").body()
    assert errors.InternalError("rid-9").body() == {"detail": "Internal error; quote request id rid-9.",
                                                    "code": "internal_error"}


def test_the_task_list_in_the_api_comes_from_the_model_package():
    app = create_app(test_settings(ui_enabled=False), models=fake_models())
    (task,) = [p for p in app.openapi()["paths"]["/restore/{task}"]["post"]["parameters"] if p["name"] == "task"]
    assert task["schema"]["enum"] == list(TASKS) and set(TASKS) == {"deblur", "derain", "denoise"}
