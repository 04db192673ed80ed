import Foundation
import HeraldCore

/// One operation of `openapi.yaml` as the request boundary needs it (see `SpecRoutes`).
struct SpecRoute: Sendable {
    var operationID: String
    var method: String
    /// The path template, e.g. `/v1/groups/{groupId}/members/{userId}`.
    var path: String
    /// The query parameters the operation declares; any other is refused (400).
    var query: Set<String>
    /// JSON path → the most characters (or, for `path#items`, items) the contract allows there.
    var limits: [String: Int] = [:]
    /// Query or path parameter → what its value must be: `integer`, `boolean`, `enum:A|B`,
    /// `date-time` or `string:MAXLENGTH` (`scripts/spec-routes.py`).
    var parameterRules: [String: String] = [:]
    /// JSON path of the body → what a value there must be: `enum:A|B`, `date-time` or `integer`.
    var bodyRules: [String: String] = [:]
    /// The query parameters that may be given more than once (arrays); any other twice is a 400.
    var repeatable: Set<String> = []
    /// Whether the operation declares a request body; a body sent to one that does not is a 400.
    var takesBody = true
    /// The query parameters the operation requires; a request without one is a 400 naming it.
    var requiredQuery: Set<String> = []

    /// How many segments of the template are fixed words, not `{…}` parameters.
    var literalSegments: Int { path.split(separator: "/").filter { !$0.hasPrefix("{") }.count }

    /// True when `path` (no query string) fits this template, each `{…}` one segment.
    func matches(path candidate: Substring) -> Bool {
        let template = path.split(separator: "/", omittingEmptySubsequences: false)
        let parts = candidate.split(separator: "/", omittingEmptySubsequences: false)
        guard template.count == parts.count else { return false }
        return zip(template, parts).allSatisfy { t, p in (t.hasPrefix("{") && t.hasSuffix("}") && !p.isEmpty) || t == p }
    }
}

extension SpecRoutes {
    static let byOperationID: [String: SpecRoute] = Dictionary(operations.map { ($0.operationID, $0) }, uniquingKeysWith: { a, _ in a })

    /// The methods the contract serves on this path, for 405's `Allow`; empty for an unknown path.
    static func allowedMethods(path: String) -> [String] {
        let bare = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        // A fixed segment wins over a template one (`mark-read` over `{notificationId}`), as
        // OpenAPI path matching says.
        let matching = operations.filter { $0.matches(path: bare) }
        let best = matching.map(\.literalSegments).max() ?? 0
        return Set(matching.filter { $0.literalSegments == best }.map(\.method)).sorted()
    }

    /// The first name or value of the query string whose percent escapes do not decode (a `%` not
    /// followed by two hexadecimal digits, or bytes that are not UTF-8), as a sentence naming it.
    /// The generated decoders read such a value as empty, and an empty filter is no filter: a
    /// search for `memb%ZZ` answered every user (a trial).
    static func undecodableQueryPart(of path: String) -> String? {
        guard let query = path.split(separator: "?", maxSplits: 1).dropFirst().first else { return nil }
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let halves = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            for half in halves where half.removingPercentEncoding == nil {
                let name = halves[0].removingPercentEncoding ?? halves[0]
                let shown = half.count > 40 ? "\(half.prefix(40))…" : half
                return "Query parameter \"\(name)\": \"\(shown)\" is not valid percent-encoding (each % takes two hexadecimal digits, "
                    + "and the bytes must be UTF-8); encode the value, e.g. with curl's --data-urlencode and -G."
            }
        }
        return nil
    }

    /// The query string's names and values, `+` and percent escapes decoded (form style, as the
    /// generated decoders read them).
    static func queryPairs(of path: String) -> [(name: String, value: String)] {
        guard let query = path.split(separator: "?", maxSplits: 1).dropFirst().first else { return [] }
        return query.split(separator: "&").filter { !$0.isEmpty }.map { pair in
            let halves = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map {
                String($0).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String($0)
            }
            return (halves[0], halves.count > 1 ? halves[1] : "")
        }
    }
}

extension SpecRoute {
    /// The first query or path parameter of `path` (`query`: its query string's pairs) whose value the
    /// contract does not allow, as a 400 naming it and what it takes. The generated decoders
    /// would refuse most of these too, without saying which parameter or what it takes.
    func parameterProblem(in path: String, query: [(name: String, value: String)]) -> APIError? {
        let parts = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        var values: [(String, String)] = []
        let template = self.path.split(separator: "/", omittingEmptySubsequences: false)
        let segments = parts[0].split(separator: "/", omittingEmptySubsequences: false)
        for (name, segment) in zip(template, segments) where name.hasPrefix("{") && name.hasSuffix("}") {
            values.append((String(name.dropFirst().dropLast()), String(segment).removingPercentEncoding ?? String(segment)))
        }
        values += query.map { ($0.name, $0.value) }
        for (name, value) in values {
            guard let rule = parameterRules[name] else { continue }
            if let problem = Self.ruleProblem(name: name, value: value, rule: rule) { return .badRequest(problem) }
        }
        return nil
    }

    /// The first string of the body `json` that the contract's enumerations or date-times
    /// refuse, as a 400 naming the field and what it takes (the generated decoders name the
    /// Swift type instead, and for a date not even the field).
    func bodyProblem(in json: Any) -> APIError? {
        for (path, rule) in bodyRules.sorted(by: { $0.key < $1.key }) {
            var problem: String?
            Self.visit(json, path.split(separator: ".").map(String.init)[...], label: "") { value, field in
                guard problem == nil else { return }
                if let text = value as? String {
                    problem = Self.ruleProblem(name: field, value: text, rule: rule)
                } else if rule == "integer", let number = value as? NSNumber {
                    // Another type is the decoders' to name; a fraction or a number past 2^53 is ours.
                    let double = number.doubleValue
                    if double.rounded() != double || abs(double) > 9_007_199_254_740_991 {
                        problem = "\(field): \(number) is not a whole number Herald can take."
                    }
                }
            }
            if let problem { return .badRequest(problem) }
        }
        return nil
    }

    /// What is wrong with `value` of `name` under `rule` (`parameterRules`, `bodyRules`), or nil.
    static func ruleProblem(name: String, value: String, rule: String) -> String? {
        let shown = value.count > 40 ? "\"\(value.prefix(40))…\"" : "\"\(value)\""
        switch rule {
        case "integer" where Int(value) == nil:
            return "\(name): \(shown) is not a whole number."
        case "boolean" where value != "true" && value != "false":
            return "\(name): \(shown) is not true or false."
        case "date-time" where RFC3339.date(from: value) == nil:
            return "\(name): \(shown) is not an RFC 3339 date-time such as 2027-03-31T08:00:00Z."
        case let rule where rule.hasPrefix("enum:"):
            let allowed = rule.dropFirst("enum:".count).split(separator: "|").map(String.init)
            if allowed.contains(value) { return nil }
            // `state=SCHEDULED` where the filter is lowercase (or the other way round): say which.
            if let spelt = allowed.first(where: { $0.caseInsensitiveCompare(value) == .orderedSame }) {
                return "\(name): \(shown) is not one of \(allowed.joined(separator: ", ")): write \"\(spelt)\"."
            }
            return "\(name): \(shown) is not one of \(allowed.joined(separator: ", "))."
        case let rule where rule.hasPrefix("string:"):
            if let limit = Int(rule.dropFirst("string:".count)), value.unicodeScalars.count > limit {
                return "\(name): must be at most \(limit) characters."
            }
            return nil
        default:
            return nil
        }
    }

    /// The first value of `json` longer than the contract allows, as a 422's field and message.
    /// Lengths count Unicode code points, as JSON Schema's `maxLength` does.
    func lengthViolation(in json: Any) -> ValidationError? {
        for (path, limit) in limits.sorted(by: { $0.key < $1.key }) {
            let items = path.hasSuffix("#items")
            let bare = items ? String(path.dropLast("#items".count)) : path
            let segments = bare == "$" ? [] : bare.split(separator: ".").map(String.init)
            var violation: ValidationError?
            Self.visit(json, segments[...], label: "") { value, field in
                guard violation == nil else { return }
                if items, let array = value as? [Any], array.count > limit {
                    violation = ValidationError(field: field, message: "must have at most \(limit) items.")
                } else if !items, let text = value as? String, text.unicodeScalars.count > limit {
                    violation = ValidationError(field: field, message: "must be at most \(limit) characters.")
                }
            }
            if let violation { return violation }
        }
        return nil
    }

    /// Calls `leaf` with each value at the JSON path `segments` (`a.b`, `list[]`, `map.*`) of
    /// `value`, and its field as a client reads it (`items[2].channel`; `body` for the root).
    static func visit(_ value: Any, _ segments: ArraySlice<String>, label: String, _ leaf: (Any, String) -> Void) {
        guard var name = segments.first else {
            leaf(value, label.isEmpty ? "body" : label)
            return
        }
        var depth = 0
        while name.hasSuffix("[]") { name.removeLast(2); depth += 1 }
        let rest = segments.dropFirst()
        func descend(_ child: Any, _ depth: Int, _ label: String) {
            guard depth > 0 else { return visit(child, rest, label: label, leaf) }
            guard let array = child as? [Any] else { return }
            for (index, element) in array.enumerated() { descend(element, depth - 1, "\(label)[\(index)]") }
        }
        if name.isEmpty { return descend(value, depth, label) }
        guard let object = value as? [String: Any] else { return }
        let children: [(String, Any)] =
            name == "*" ? object.sorted { $0.key < $1.key }.map { ($0.key, $0.value) } : object[name].map { [(name, $0)] } ?? []
        for (key, child) in children { descend(child, depth, label.isEmpty ? key : "\(label).\(key)") }
    }
}
