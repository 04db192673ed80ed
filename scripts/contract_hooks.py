"""schemathesis hooks for scripts/contract.sh: test data the schema cannot describe.

Some values are valid only if they name something that exists in the organisation (a category,
a notification type, a role, a user) or that the server can reach (a webhook URL), or if the
server handed them out (a page cursor). No schema can say that, so a drawn value is rightly
refused with 422. Before each call such a value is replaced by a real one from the seeded
organisation (CONTRACT_FIXTURES, JSON written by contract.sh); everything else in the request is
sent as drawn, so its shape is still checked. The fixtures the run depends on (its own API key,
the owner it logs in as) are kept out of destructive calls.
"""

import base64
import json
import os
import uuid
from datetime import datetime, timedelta, timezone

import schemathesis

FIXTURES = json.loads(os.environ.get("CONTRACT_FIXTURES") or "{}")
ZERO = "00000000-0000-0000-0000-000000000000"
TIME_ZONES = ["Europe/Paris", "UTC", "America/New_York", "Asia/Tokyo"]


def _encoded(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


# Cursors of the shape the server hands out, pointing at the start: the feed orders by
# (read, id), every other list by (time, id).
FEED_CURSOR = _encoded({"read": False, "id": ZERO})
PAGE_CURSOR = _encoded({"t": 0, "i": ZERO})


def _pick(values: list, drawn):
    """`drawn` if it is one of `values`, else one of them chosen by the drawn value (repeatable)."""
    if not values or drawn in values:
        return drawn
    return values[len(str(drawn)) % len(values)]


def _fix_category(holder: dict) -> None:
    if isinstance(holder, dict) and isinstance(holder.get("category"), str):
        holder["category"] = _pick(FIXTURES.get("categories", []), holder["category"])


def _settable_cell(cell, personal: bool, critical=()) -> None:
    """A preference cell the server can store: a user's names in-app or email (webhook and chat are
    the organisation's), and a critical category's in-app cell is as the critical override has it."""
    if not isinstance(cell, dict):
        return
    if personal and cell.get("channel") in ("webhook", "chat"):
        cell["channel"] = "email"
    if cell.get("channel") == "in_app" and cell.get("category") in list(critical) + FIXTURES.get("critical_categories", []):
        cell.update({"enabled": True, "frequency": "IMMEDIATE", "conditions": []})


def _ordered_window(holder: dict) -> None:
    """`until` not before `since` (a reversed window is a 422 no schema can express)."""
    since, until = _instant(holder.get("since")), _instant(holder.get("until"))
    if since is not None and until is not None and until < since:
        holder["until"] = holder["since"]


def _fix_query(case) -> None:
    query = case.query
    if not isinstance(query, dict):
        return
    _ordered_window(query)
    if "cursor" in query:
        query["cursor"] = FEED_CURSOR if case.operation.path == "/v1/me/notifications" else PAGE_CURSOR
    if case.operation.path in (
        "/v1/events", "/v1/me/notifications", "/v1/me/preferences/resolved", "/v1/users/{userId}/preferences/resolved"
    ) and "type" in query:
        query["type"] = _pick(FIXTURES.get("types", []), query["type"])
    if case.operation.path in ("/v1/me/notifications", "/v1/me/preferences/resolved", "/v1/users/{userId}/preferences/resolved"):
        _fix_category(query)
    if "preferences/resolved" in case.operation.path and "type" in query and "category" in query:
        del query["category"]  # a type of another category is a 422
    if case.operation.path == "/v1/audit-log" and "action" in query:
        # An action Herald never records is a typo (422); these it records in every run.
        query["action"] = _pick(["user.create", "user.update", "apikey.create", "schedule.create"], query["action"])
    if case.operation.path == "/v1/notifications/debug":
        if "event" in query:
            query["event"] = _pick(FIXTURES.get("types", []), query["event"])
        if "user_id" in query:
            query["user_id"] = _pick(FIXTURES.get("users", []), query["user_id"])


def _instant(text):
    if not isinstance(text, str):
        return None
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        return instant if instant.tzinfo else None
    except (ValueError, OverflowError):
        return None


WEEKDAYS = {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}


def _fix_condition(condition) -> None:
    """What each operator needs (HeraldCore Condition.validate): a value, or a non-empty list."""
    if not isinstance(condition, dict):
        return
    op = condition.get("op")
    if op == "equals" and condition.get("value") is None:
        condition["value"] = "x"
    if op in ("in", "not_in") and not condition.get("values"):
        condition["values"] = ["x"]
    if op == "weekday_in":
        values = condition.get("values")
        if not values or not all(isinstance(v, str) and v.lower() in WEEKDAYS for v in values):
            condition["values"] = ["monday"]
    # A condition on event.type names types of the organisation (a typo is a 422).
    if condition.get("field") == "event.type" and op in ("equals", "in", "not_in"):
        types = FIXTURES.get("types", [])
        if isinstance(condition.get("value"), str):
            condition["value"] = _pick(types, condition["value"])
        if isinstance(condition.get("values"), list):
            condition["values"] = [_pick(types, v) if isinstance(v, str) else v for v in condition["values"]]


def _later(text: str) -> str:
    """An instant after `text` (or after now), in the same RFC 3339 form the server reads."""
    base = _instant(text) or datetime.now(timezone.utc)
    try:
        return (base.astimezone(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OverflowError:
        return (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fix_conditions(value) -> None:
    """Every list of conditions in the body, wherever it is (preferences, catalogue documents)."""
    if isinstance(value, dict):
        for key, member in value.items():
            if key == "conditions" and isinstance(member, list):
                for condition in member:
                    _fix_condition(condition)
            else:
                _fix_conditions(member)
    elif isinstance(value, list):
        for item in value:
            _fix_conditions(item)


# What a list may name only once: a key; a preference cell; a template's channel and locale.
UNIQUE_BY = [("key",), ("category", "channel"), ("channel", "locale"), ("locale",)]


def _one_cell_each(value) -> None:
    """Drops repeats from lists that must name each thing once (the categories above may now repeat)."""
    if isinstance(value, dict):
        for key, member in value.items():
            fields = next((f for f in UNIQUE_BY if isinstance(member, list) and member
                           and all(isinstance(i, dict) and all(n in i for n in f) for i in member)), None)
            if fields is not None:
                seen, cells = set(), []
                for item in member:
                    # A locale is compared as the server canonicalises it (`FR` is `fr`).
                    cell = repr(tuple(str(item[n]).lower() if n == "locale" else item[n] for n in fields))
                    if cell not in seen:
                        seen.add(cell)
                        cells.append(item)
                value[key] = cells
            _one_cell_each(value[key])
    elif isinstance(value, list):
        for item in value:
            _one_cell_each(item)


def _plain_templates(value) -> None:
    """Template text must parse as Mustache (a 422 naming the line otherwise), which drawn
    braces seldom do: they become parentheses, and the rest of the text is sent as drawn."""
    if isinstance(value, dict):
        for key, member in value.items():
            if key in ("subject", "body", "html") and isinstance(member, str):
                value[key] = member.replace("{", "(").replace("}", ")")
            else:
                _plain_templates(member)
    elif isinstance(value, list):
        for item in value:
            _plain_templates(item)


def _whole_quiet_hours(holder) -> None:
    """Quiet hours with both times or none, and not equal (a window no schema can describe)."""
    window = holder.get("quiet_hours") if isinstance(holder, dict) else None
    if not isinstance(window, dict):
        return
    if ("start" in window) != ("end" in window):
        window.pop("start", None)
        window.pop("end", None)
    elif window.get("start") == window.get("end") and isinstance(window.get("start"), str):
        window["end"] = "07:00" if window["start"] != "07:00" else "08:00"


def _fix_body(case) -> None:
    body, path, method = case.body, case.operation.path, case.method.upper()
    if not isinstance(body, dict):
        return
    _whole_quiet_hours(body)
    for user in body.get("users") or [] if path == "/v1/users/import" else []:
        _whole_quiet_hours(user)
    _fix_conditions(body)
    _ordered_window(body)
    if path == "/v1/catalogue" or "/templates" in path or path.startswith("/v1/digest-templates"):
        _plain_templates(body)
    for field in ("timezone", "default_timezone", "time_zone"):
        if isinstance(body.get(field), str) and body[field] != "":
            body[field] = _pick(TIME_ZONES, body[field])
    if isinstance(body.get("permissions"), list):
        known = FIXTURES.get("permissions", [])
        body["permissions"] = [_pick(known, p) for p in body["permissions"]]
    if path == "/v1/api-keys" and "role_id" in body:
        body["role_id"] = _pick(FIXTURES.get("role_ids", []), body["role_id"])
    # A key cannot expire in the past; an event cannot expire before it is delivered.
    if path == "/v1/api-keys" and isinstance(body.get("expires_at"), str):
        instant = _instant(body["expires_at"])
        if instant is None or instant <= datetime.now(timezone.utc):
            body["expires_at"] = _later("")
    if path in ("/v1/events", "/v1/events/dry-run") and isinstance(body.get("deliver_at"), str):
        # At most 366 days ahead (a later one is a typo the server refuses).
        instant = _instant(body["deliver_at"])
        if instant is not None and instant > datetime.now(timezone.utc) + timedelta(days=365):
            body["deliver_at"] = _later("")
    if path in ("/v1/events", "/v1/events/dry-run") and isinstance(body.get("expires_at"), str):
        start = max(_instant(body.get("deliver_at")) or datetime.min.replace(tzinfo=timezone.utc), datetime.now(timezone.utc))
        end = _instant(body["expires_at"])
        if end is not None and end <= start:
            body["expires_at"] = _later(start.isoformat())
    if path == "/v1/users/import" and isinstance(body.get("group_ids"), list):
        body["group_ids"] = [_pick(FIXTURES.get("group_ids", []), g) for g in body["group_ids"]]
    if path == "/v1/users/import" and isinstance(body.get("users"), list):
        for user in body["users"]:
            if isinstance(user, dict) and isinstance(user.get("timezone"), str) and user["timezone"] != "":
                user["timezone"] = _pick(TIME_ZONES, user["timezone"])
    if path == "/v1/users/{userId}/roles" and isinstance(body.get("role_ids"), list):
        body["role_ids"] = [_pick(FIXTURES.get("role_ids", []), r) for r in body["role_ids"]]
    if path.startswith("/v1/notification-types"):
        _fix_category(body)
    if path == "/v1/notification-types/{typeId}/preview":
        # A draft must parse; a user must exist; a url must be one the server links to.
        _plain_templates(body)
        if "user_id" in body:
            body["user_id"] = _pick(FIXTURES.get("users", []), body["user_id"])
        if "url" in body:
            body["url"] = "https://clinic.example/implants/42"
    if path == "/v1/catalogue":
        # A catalogue document may name its own categories or the organisation's.
        own = [c.get("key") for c in body.get("categories") or [] if isinstance(c, dict)]
        known = FIXTURES.get("categories", []) + [k for k in own if isinstance(k, str)]
        for member in ("types", "preference_defaults"):
            for item in body.get(member) or []:
                if isinstance(item, dict) and isinstance(item.get("category"), str):
                    item["category"] = _pick(known, item["category"])
    if isinstance(body.get("items"), list) and "/preference" in path:
        for item in body["items"]:
            _fix_category(item)
            _settable_cell(item, personal=path in ("/v1/me/preferences", "/v1/users/{userId}/preferences"))
    if isinstance(body.get("inherit"), list) and "/preference" in path:
        # A PATCH's cells to inherit: known categories, none also in items (a 422).
        for item in body["inherit"]:
            _fix_category(item)
        set_keys = {repr((i.get("category"), i.get("channel"))) for i in body.get("items") or [] if isinstance(i, dict)}
        body["inherit"] = [i for i in body["inherit"]
                           if not isinstance(i, dict) or repr((i.get("category"), i.get("channel"))) not in set_keys]
    if path == "/v1/catalogue":
        own = [c.get("key") for c in body.get("categories") or [] if isinstance(c, dict) and c.get("critical")]
        for item in body.get("preference_defaults") or []:
            _settable_cell(item, personal=False, critical=own)
    _one_cell_each(body)
    if (path == "/v1/schedules" and method == "POST") or (path == "/v1/schedules/{scheduleId}" and method == "PATCH"):
        # A rule the server can read (the RRULE grammar is no schema's business).
        if "rule" in body:
            body["rule"] = _pick(RULES, body["rule"])
        # A schedule starts at most 30 days back and 10 years ahead (no schema says "now").
        if "starts_at" in body:
            start = _instant(body["starts_at"])
            now = datetime.now(timezone.utc)
            if start is None or start < now - timedelta(days=29) or start > now + timedelta(days=3649):
                body["starts_at"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(body.get("event"), dict):
            _fix_event(body["event"])
    if path in ("/v1/events", "/v1/events/dry-run"):
        _fix_event(body)
    if path.startswith("/v1/endpoints") and method in ("POST", "PATCH"):
        if "url" in body and FIXTURES.get("receiver"):
            body["url"] = FIXTURES["receiver"]
        if isinstance(body.get("event_types"), list):
            body["event_types"] = [_pick(FIXTURES.get("types", []), t) for t in body["event_types"]]
        # A webhook speaks the standard format, chat Slack's or Mattermost's.
        if body.get("channel") == "webhook" and "format" in body:
            body["format"] = "standard"
        if body.get("channel") == "chat" and body.get("format") == "standard":
            body["format"] = "slack"


RULES = ["FREQ=DAILY;BYHOUR=9;BYMINUTE=0", "FREQ=WEEKLY;BYDAY=MO,FR", "FREQ=MONTHLY;BYMONTHDAY=1;COUNT=3"]


def _fix_event(body: dict) -> None:
    """An event's type and audience name what exists (notify's body, or a schedule's event)."""
    if "type" in body:
        body["type"] = _pick(FIXTURES.get("types", []), body["type"])
    if "audience" in body:
        # Someone who exists, by role key; exclusions name users who exist (an unknown one is a 422).
        audience = {"roles": [_pick(FIXTURES.get("role_keys", []), "member")]}
        if isinstance(body["audience"], dict) and isinstance(body["audience"].get("exclude_user_ids"), list):
            audience["exclude_user_ids"] = [_pick(FIXTURES.get("users", []), u) for u in body["audience"]["exclude_user_ids"]]
        body["audience"] = audience


def _fix_headers(case) -> None:
    """An Idempotency-Key is unique per event: a drawn one may already name another body (422)."""
    headers = case.headers
    if headers is None:
        return
    for name in list(headers.keys()):
        if name.lower() == "idempotency-key" and isinstance(headers[name], str):
            headers[name] = uuid.uuid4().hex


def _protect_fixtures(case) -> None:
    """The run's own key and the owner it acts as are never revoked, deactivated or demoted."""
    params = case.path_parameters
    if not isinstance(params, dict):
        return
    protected = set(FIXTURES.get("protect", []))
    for name, value in list(params.items()):
        if isinstance(value, str) and value.lower() in protected:
            params[name] = str(uuid.UUID(int=uuid.UUID(value).int ^ 1))


@schemathesis.hook
def before_call(context, case, kwargs):
    _protect_fixtures(case)
    _fix_headers(case)
    _fix_query(case)
    _fix_body(case)
