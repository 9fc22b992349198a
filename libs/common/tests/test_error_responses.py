import orjson

from mensajero_common.error_responses import error_response


def test_error_with_lone_surrogate_renders() -> None:
    body = {"success": False, "error": "invalid_region", "details": ["MX\ud800", 3]}

    response = error_response(400, body, "en")

    assert response.status_code == 400
    assert orjson.loads(response.body)["details"] == ["MX\ufffd", 3]


def test_error_without_surrogate_unchanged() -> None:
    body = {"success": False, "error": "not_found", "message": "ñandú \U0001f600"}

    response = error_response(404, body, "es")

    assert orjson.loads(response.body) == body
