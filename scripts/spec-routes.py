#!/usr/bin/env python3
"""Writes Sources/HeraldAPI/SpecRoutes.swift from openapi.yaml: every operation's method, path
template and query parameters, so the server can answer 405 with Allow and refuse unknown query
parameters by the contract itself. `make spec` runs it; a test fails when the file is stale."""
import sys, yaml, pathlib

root = pathlib.Path(__file__).resolve().parent.parent
spec = yaml.safe_load(open(root / "openapi.yaml"))


def nulls(node, path=""):
    """Keys whose value is null: in openapi.yaml, always an unquoted comma in a flow mapping
    (`{description: a, b}` reads as the description "a" and a key "b"), which cut a trial's
    descriptions short."""
    if isinstance(node, dict):
        for key, value in node.items():
            if value is None:
                yield f"{path}/{key}"
            yield from nulls(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nulls(value, f"{path}[{index}]")


broken = list(nulls(spec))
if broken:
    sys.exit("openapi.yaml: a value cut short by an unquoted comma (quote it): " + ", ".join(broken))
def resolve(schema):
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema


def walk(schema, prefix, visit, alternatives, depth=0):
    """Calls `visit(schema, path)` for every schema under a request body, by JSON path (`a.b`,
    `list[]`, `map.*`; "" for the body itself), through allOf, and through oneOf and anyOf when
    `alternatives` is true."""
    if depth > 8:
        return
    schema = resolve(schema)
    parts = schema.get("allOf", []) + (schema.get("oneOf", []) + schema.get("anyOf", []) if alternatives else [])
    for part in parts:
        walk(part, prefix, visit, alternatives, depth + 1)
    visit(schema, prefix)
    for name, sub in (schema.get("properties") or {}).items():
        walk(sub, prefix + "." + name if prefix else name, visit, alternatives, depth + 1)
    if isinstance(schema.get("additionalProperties"), dict):
        walk(schema["additionalProperties"], (prefix + "." if prefix else "") + "*", visit, alternatives, depth + 1)
    if "items" in schema:
        walk(schema["items"], (prefix or "") + "[]", visit, alternatives, depth + 1)


def collect_limits(schema, out):
    """Every string's maxLength and every array's maxItems under a request body, by JSON path
    (`$` for the body itself): the server enforces what the contract declares."""
    def visit(schema, prefix):
        if "maxLength" in schema:
            out[prefix or "$"] = min(schema["maxLength"], out.get(prefix or "$", 1 << 30))
        if "maxItems" in schema:
            key = (prefix or "$") + "#items"
            out[key] = min(schema["maxItems"], out.get(key, 1 << 30))
    walk(schema, "", visit, alternatives=True)


def collect_rules(schema, out):
    """What the string and integer values of a request body must be, by JSON path:
    `enum:A|B`, `date-time` or `integer`, so the boundary names the field and what it takes (the
    generated decoders say "Cannot initialize SeverityName from invalid String value LOW", and
    for a date or a fraction where a whole number goes, not even which field). Alternatives of a
    oneOf or anyOf are left to the decoders: a value one refuses another may take."""
    def visit(schema, prefix):
        if not prefix or schema.get("type") not in ("string", "integer"):
            return
        rule = parameter_rule(schema)
        if rule and (rule.startswith("enum:") or rule in ("date-time", "integer")):
            # Two schemas that disagree on a path leave it to the decoders (None).
            out[prefix] = rule if out.get(prefix, rule) == rule else None
    walk(schema, "", visit, alternatives=False)


def parameter_rule(schema):
    """What a query or path parameter's value must be, as the boundary checks it before the
    generated decoders (whose errors name neither the parameter nor the expected values):
    `integer`, `boolean`, `enum:A|B`, `date-time` or `string:MAXLENGTH`; arrays by their
    items. UUIDs are left to the handlers (a malformed id is a 422 naming it)."""
    schema = resolve(schema)
    if schema.get("type") == "array":
        schema = resolve(schema.get("items", {}))
    kind = schema.get("type")
    if "enum" in schema:
        return "enum:" + "|".join(str(v) for v in schema["enum"])
    if kind == "integer":
        return "integer"  # its range is the handler's to check (a 422 naming it)
    if kind == "boolean":
        return "boolean"
    if kind == "string" and schema.get("format") == "date-time":
        return "date-time"
    if kind == "string" and "maxLength" in schema:
        return "string:%d" % schema["maxLength"]
    return None


rows = []
for path, item in spec["paths"].items():
    shared = [p for p in item.get("parameters", [])]
    for method, op in item.items():
        if method == "parameters":
            continue
        params = shared + op.get("parameters", [])
        query = []
        repeatable = []
        required = []
        rules = {}
        for p in params:
            if "$ref" in p:
                name = p["$ref"].split("/")[-1]
                p = spec["components"]["parameters"][name]
            if p.get("in") == "query":
                query.append(p["name"])
                if p.get("required"):
                    required.append(p["name"])
                if resolve(p.get("schema", {})).get("type") == "array":
                    repeatable.append(p["name"])
            if p.get("in") in ("query", "path"):
                rule = parameter_rule(p.get("schema", {}))
                if rule:
                    rules[p["name"]] = rule
        limits = {}
        body_rules = {}
        body = (op.get("requestBody") or {}).get("content", {}).get("application/json")
        if body:
            collect_limits(body.get("schema", {}), limits)
            collect_rules(body.get("schema", {}), body_rules)
        body_rules = {k: v for k, v in body_rules.items() if v}
        takes_body = "requestBody" in op
        rows.append((op["operationId"], method.upper(), path, sorted(query), limits, rules, body_rules, sorted(repeatable), takes_body,
                     sorted(required)))
rows.sort(key=lambda r: (r[2], r[1]))
out = ["// swift-format-ignore-file", "// Generated by scripts/spec-routes.py from openapi.yaml (`make spec`); do not edit.", "",
       "/// Every operation of the contract: method, path template, the query parameters it accepts,",
       "/// the length limits (`maxLength`, `maxItems` as `path#items`) of its JSON body by JSON path, and",
       "/// what its query and path parameters' values must be (`SpecRoute.parameterRules`), and what",
       "/// its JSON body's enumerated and date-time strings must be, by JSON path (`SpecRoute.bodyRules`);",
       "/// the query parameters that may be given more than once (arrays), whether it takes a body,",
       "/// and the query parameters it requires.",
       "enum SpecRoutes {",
       "    static let operations: [SpecRoute] = ["]
for op_id, method, path, query, limits, rules, body_rules, repeatable, takes_body, required in rows:
    q = ", ".join('"%s"' % n for n in query)
    l = ", ".join('"%s": %d' % (k, v) for k, v in sorted(limits.items())) or ":"
    r = ", ".join('"%s": "%s"' % (k, v) for k, v in sorted(rules.items())) or ":"
    b = ", ".join('"%s": "%s"' % (k, v) for k, v in sorted(body_rules.items())) or ":"
    out.append('        SpecRoute(operationID: "%s", method: "%s", path: "%s", query: [%s],' % (op_id, method, path, q))
    out.append('                  limits: [%s],' % l)
    out.append('                  parameterRules: [%s],' % r)
    out.append('                  bodyRules: [%s],' % b)
    out.append('                  repeatable: [%s], takesBody: %s%s),' % (
        ", ".join('"%s"' % n for n in repeatable), "true" if takes_body else "false",
        (", requiredQuery: [%s]" % ", ".join('"%s"' % n for n in required)) if required else ""))
out += ["    ]", "}", ""]
text = "\n".join(out)
if len(sys.argv) > 1 and sys.argv[1] == "--stdout":
    sys.stdout.write(text)
else:
    (root / "Sources/HeraldAPI/SpecRoutes.swift").write_text(text)
