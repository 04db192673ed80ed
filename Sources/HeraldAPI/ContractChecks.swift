import Foundation
import HTTPTypes
import OpenAPIRuntime

/// What the generated decoders cannot see, checked before them against the contract (issue 8):
/// - A query parameter the operation does not declare is refused (400 naming it): a mistyped
///   filter must not silently return everything.
/// - Every `maxLength`/`maxItems` `openapi.yaml` declares under the body is enforced (422 naming
///   the field), from the table `scripts/spec-routes.py` generates (`SpecRoutes`).
/// - A query or path parameter of the wrong kind (`limit=abc`, `severity=BAD`, a channel the
///   path does not take, one longer than declared) is a 400 naming it and what it takes.
/// - A request without content has no body. The transport hands over an empty body, which the
///   generated code fails to decode as JSON, so an optional body (`rotate-secret`) could not be
///   left out. A required body that is missing is still refused by the generated code.
/// - `null` is refused for Herald's own fields (400): the decoders read it as "absent", so a
///   `PATCH` with `"locale": null` would silently change nothing. Inside free-form JSON (payload,
///   actor, attributes, condition values) `null` is an ordinary value. See docs/decisions.md.
/// - Text with U+0000 is refused (400): PostgreSQL cannot store it in `text` or `jsonb`, so it
///   used to end as a 500.
/// - A JSON body must be RFC 8259 JSON (`StrictJSON`): no trailing comma, no key twice in one
///   object, no number beyond a 64-bit float (400 naming where).
///
/// `TenantBoundary` runs these checks once the caller may call the operation, so a stranger
/// learns nothing of the contract before a 401 or 403.
struct ContractChecks: Sendable {
    let maxBodyBytes: Int

    /// Request members holding the client's own JSON objects: `null` is allowed inside them.
    static let freeForm: Set<String> = ["payload", "actor", "attributes"]
    /// Request members that may be any JSON value, `null` included (a condition's operands).
    static let anyValue: Set<String> = ["value", "values"]

    /// The body the operation should see (nil when the request has no content), or a 400/422.
    func checked(_ request: HTTPRequest, body: HTTPBody?, operationID: String) async throws -> HTTPBody? {
        if let query = request.path?.split(separator: "?", maxSplits: 1).dropFirst().first, query.lowercased().contains("%00") {
            throw APIError.badRequest("A query parameter contains the character U+0000, which Herald does not accept in text.")
        }
        let route = SpecRoutes.byOperationID[operationID]
        if let route {
            // The query string is read once for both checks.
            let path = request.path ?? ""
            if let problem = SpecRoutes.undecodableQueryPart(of: path) { throw APIError.badRequest(problem) }
            let pairs = SpecRoutes.queryPairs(of: path)
            if let name = pairs.first(where: { !route.query.contains($0.name) })?.name {
                let accepted = route.query.sorted()
                throw APIError.badRequest(
                    "Unknown query parameter \"\(name)\". "
                        + (accepted.isEmpty ? "This operation takes none." : "This operation takes: \(accepted.joined(separator: ", "))."))
            }
            var seen = Set<String>()
            if let name = pairs.map(\.name).first(where: { !seen.insert($0).inserted && !route.repeatable.contains($0) }) {
                throw APIError.badRequest("Query parameter \"\(name)\" is given more than once; it takes one value.")
            }
            // Checked here, not left to the generated decoders: with another parameter given, they
            // named the missing one "body" ("body: Value not found.", a trial).
            if let name = route.requiredQuery.sorted().first(where: { name in !pairs.contains { $0.name == name } }) {
                throw APIError.badRequest("\(name): this query parameter is required.")
            }
            if let problem = route.parameterProblem(in: path, query: pairs) { throw problem }
        }
        let hasContent =
            request.headerFields[.transferEncoding] != nil
            || (request.headerFields[.contentLength].flatMap { Int($0) } ?? 0) > 0
        guard let body, hasContent, body.length != .known(0) else { return nil }
        if let route, !route.takesBody {
            // Nothing is silently ignored; an empty JSON object, as some clients send with every POST, is nothing.
            let data = try await Data(collecting: body, upTo: maxBodyBytes)
            let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            let emptyObject = (try? JSONSerialization.jsonObject(with: data) as? [String: Any])?.isEmpty == true
            guard text.isEmpty || emptyObject else {
                throw APIError.badRequest("This operation takes no request body; send none (openapi.yaml lists what each operation takes).")
            }
            return nil
        }
        guard request.headerFields[.contentType]?.lowercased().hasPrefix("application/json") == true else { return body }
        let data = try await Data(collecting: body, upTo: maxBodyBytes)
        if let problem = StrictJSON.problem(in: data) { throw APIError.badRequest(problem) }
        let needsWalk = !(route?.limits.isEmpty ?? true) || !(route?.bodyRules.isEmpty ?? true)
        if needsWalk || Self.mayHoldNull(data), let json = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]) {
            if let problem = Self.problem(in: json, at: "", operation: route?.operationID) {
                throw APIError.badRequest(problem)
            }
            if let problem = route?.bodyProblem(in: json) { throw problem }
            if let violation = route?.lengthViolation(in: json) { throw APIError.unprocessable(violation) }
        }
        return HTTPBody(data)
    }

    /// The value that clears a user's own setting `field` (the organisation's applies again), in
    /// the operations that change a user; elsewhere (the organisation's own digest hour) none does.
    static func clearingValue(of field: String, in operation: String?) -> String? {
        guard let operation, ["createUser", "importUsers", "updateUser", "updateMe"].contains(operation) else { return nil }
        return ["digest_hour": "-1", "digest_weekday": "0", "timezone": "\"\"", "quiet_hours": "{}"][field]
    }

    /// Whether the raw bytes contain `null` or `\u0000` at all: most bodies need no parse here.
    static func mayHoldNull(_ data: Data) -> Bool {
        data.range(of: Data("null".utf8)) != nil || data.range(of: Data("u0000".utf8)) != nil
    }

    /// The first `null` field or U+0000 in `value`, as a sentence naming where it is.
    static func problem(in value: Any, at path: String, freeForm: Bool = false, operation: String? = nil) -> String? {
        switch value {
        case is NSNull:
            guard !freeForm else { return nil }
            let field = path.split(separator: ".").last.map(String.init) ?? ""
            // Fields that a value clears say which: null is the usual guess.
            let clear = Self.clearingValue(of: field, in: operation).map { " To clear \(field), send \($0)." } ?? ""
            return
                "\(path.isEmpty ? "body" : path): null is not accepted: give a value, or leave the field out where it is optional.\(clear)"
        case let text as String:
            return text.unicodeScalars.contains("\u{0}")
                ? "\(path.isEmpty ? "body" : path): contains the character U+0000, which Herald does not accept in text." : nil
        case let object as [String: Any]:
            for (key, member) in object.sorted(by: { $0.key < $1.key }) {
                let here = path.isEmpty ? key : "\(path).\(key)"
                if key.unicodeScalars.contains("\u{0}") { return "\(path.isEmpty ? "body" : path): a key contains the character U+0000." }
                let ownJSON = Self.anyValue.contains(key) || (Self.freeForm.contains(key) && !(member is NSNull))
                if let found = problem(in: member, at: here, freeForm: freeForm || ownJSON, operation: operation) {
                    return found
                }
            }
            return nil
        case let array as [Any]:
            for (index, item) in array.enumerated() {
                if let found = problem(in: item, at: "\(path)[\(index)]", freeForm: freeForm, operation: operation) { return found }
            }
            return nil
        default:
            return nil
        }
    }
}
