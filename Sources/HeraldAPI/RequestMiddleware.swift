import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import Logging
import NIOCore
import OpenAPIRuntime
import PostgresNIO

/// The one boundary every request crosses: request id, body limit, the credential's form, the
/// task-local scope the handlers read, problem+json for every error (the one place errors are
/// translated), one log line, metrics. `TenantBoundary` then opens the request's transaction.
struct RequestMiddleware: RouterMiddleware {
    typealias Context = HeraldRequestContext

    let authenticator: Authenticator
    let maxBodyBytes: Int
    let metrics: HTTPMetrics
    var crossOrigin = CrossOriginPolicy.none
    /// Behind these, the client is who `X-Forwarded-For` names (the login limits count by it).
    var trustedProxies = TrustedProxies([])

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        let requestID = Self.requestID(from: request.headers[.requestID])
        var logger = context.logger
        logger[metadataKey: "request_id"] = "\(requestID)"
        // HEAD is GET without the body (RFC 9110 §9.3.2), for uptime checks and link scanners: the
        // GET's handler answers (`SkippingTransport`). Every answer to a HEAD leaves its body out
        // here, a problem's too (NIO refuses to write a body after a HEAD's head).
        let head = request.method == .head
        var response: Response
        // The body as read, for a problem about it (a misspelt field's name); nil until read.
        var body: ByteBuffer?
        // The request's scope once made (its rate, for a problem's answer).
        var scope: RequestScope?
        do {
            if let preflight = try crossOrigin.preflight(request) {
                // A browser asking whether its page may call: no body, no credential.
                response = preflight
            } else if request.method == .options, case let allowed = Self.allowedMethods(path: request.uri.path), !allowed.isEmpty {
                // Any other OPTIONS asks what the path takes (RFC 9110 §9.3.7): no body, no credential.
                response = Response(status: .noContent, headers: [.allow: allowed.joined(separator: ", ")])
            } else {
                var request = request
                // Two keys would be joined into a third ("a, b") that matches neither (a trial).
                if request.headers[values: .idempotencyKey].count > 1 {
                    throw APIError.badRequest("Idempotency-Key: the header is given more than once; give it once.")
                }
                if let length = request.headers[.contentLength].flatMap(Int.init), length > maxBodyBytes {
                    throw APIError.contentTooLarge(limit: maxBodyBytes)
                }
                do {
                    body = try await request.collectBody(upTo: maxBodyBytes)
                } catch is NIOTooManyBytesError {
                    // A chunked body (no Content-Length) crossed the limit while being read.
                    throw APIError.contentTooLarge(limit: maxBodyBytes)
                } catch let error as HTTPError where error.status == .contentTooLarge {
                    throw APIError.contentTooLarge(limit: maxBodyBytes)
                }
                let credential = try await authenticator.credential(from: request.headers[.authorization], logger: logger)
                if let credential {
                    logger[metadataKey: "organisation_id"] = "\(credential.organisationID.lowercased)"
                    logger[metadataKey: "actor"] = "\(credential.actor.kind.rawValue):\(credential.actor.id?.lowercased ?? "-")"
                }
                let made = RequestScope(
                    requestID: requestID,
                    clientAddress: trustedProxies.client(
                        peer: context.remoteAddress?.ipAddress, forwardedFor: request.headers[values: .forwardedFor]),
                    credential: credential, logger: logger,
                    head: head)
                scope = made
                response = try await RequestScope.$current.withValue(made) {
                    try await next(request, context)
                }
            }
        } catch {
            response = Self.problemResponse(for: error, request: request, body: body, logger: logger)
            // Every authenticated answer says the organisation's rate, a refusal's too.
            if response.headers[.rateLimit] == nil, let scope { response.headers.append(contentsOf: scope.rateLimit.headers) }
        }
        response.headers[.requestID] = requestID
        crossOrigin.decorate(&response, for: request)
        if head {
            let length = response.headers[.contentLength]
            response.body = ResponseBody()
            response.headers[.contentLength] = length
        }
        if response.status == .contentTooLarge {
            // Reading the rest of a refused body (to keep the connection) would take as long and
            // as much as accepting it: answer, then close instead (RFC 9110 §15.5.14).
            response.headers[.connection] = "close"
            context.channel.close(mode: .input, promise: nil)
        }
        // A page (the unsubscribe confirmation, the demo pages) is never shown inside another
        // site's frame, where a click could be borrowed (a trial of the confirmation page).
        if response.headers[.contentType]?.hasPrefix("text/html") == true {
            response.headers[.xFrameOptions] = "DENY"
            let policy = response.headers[.contentSecurityPolicy]
            if policy?.contains("frame-ancestors") != true {
                response.headers[.contentSecurityPolicy] = policy.map { "\($0); frame-ancestors 'none'" } ?? "frame-ancestors 'none'"
            }
        }
        // The generated code percent-encodes header values (URI "simple" style), which turns a
        // redirect's absolute URL into one opaque token; Location is a URI already (RFC 9110).
        if let location = response.headers[.location], location.contains("%3A%2F%2F") {
            response.headers[.location] = location.removingPercentEncoding ?? location
        }
        let elapsed = ContinuousClock.now - started
        let route = context.endpointPath ?? "unmatched"
        metrics.record(method: request.method.rawValue, route: route, status: response.status.code, duration: elapsed)
        // A signed link's token is a credential (one-click unsubscribe): such paths are logged
        // as their route only.
        let path = route.contains("token") ? route : request.uri.path
        logger.info(
            "request",
            metadata: [
                "method": "\(request.method.rawValue)", "path": "\(path)", "route": "\(route)",
                "status": "\(response.status.code)", "duration_ms": "\(Double(elapsed.nanoseconds) / 1_000_000)",
            ])
        return response
    }

    /// Whether HEAD on `path` is served as its GET: the contract has a GET there and it is not a
    /// stream (an SSE or WebSocket answer has no end to leave out).
    static func servesHead(path: String) -> Bool {
        !path.hasSuffix("/stream") && !path.hasSuffix("/socket") && SpecRoutes.allowedMethods(path: path).contains("GET")
    }

    /// What `Allow` lists for `path` (its operations in the contract, HEAD where its GET serves
    /// one, and OPTIONS); empty for a path the contract does not have.
    static func allowedMethods(path: String) -> [String] {
        var allowed = SpecRoutes.allowedMethods(path: path)
        guard !allowed.isEmpty else { return [] }
        if servesHead(path: path) { allowed.append("HEAD") }
        return (allowed + ["OPTIONS"]).sorted()
    }

    /// A client's `X-Request-Id` if it is short and plain, else a fresh one.
    static func requestID(from header: String?) -> String {
        if let header, (1...64).contains(header.count),
            header.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") })
        {
            return header
        }
        return TimeOrderedID.make().lowercased
    }

    /// Maps any error to a problem+json response. Internal details go to the log, never the client.
    static func problemResponse(for error: any Error, request: Request, body: ByteBuffer? = nil, logger: Logger) -> Response {
        var problem = apiError(for: error)
        if case .badRequest(let detail) = problem, let body {
            if let hint = misspeltField(error, in: body) { problem = .badRequest(detail + hint) }
            if let said = conditionProblem(error, in: body) { problem = .badRequest(said) }
        }
        if problem == .notFound(resource: "route") {
            let allowed = allowedMethods(path: request.uri.path)
            problem =
                allowed.isEmpty || allowed.contains(request.method.rawValue)
                ? .noRoute(method: request.method.rawValue, path: request.uri.path)
                : .methodNotAllowed(method: request.method.rawValue, allowed: allowed)
        }
        if problem == .internalError {
            // Never the error's reflection: it carries the request's headers (credentials) and
            // its decoded body (event payloads). The request id ties this line to the request.
            logger.error("request failed", metadata: ["error": "\(redacted(error))"])
        } else if problem == .databaseUnavailable {
            // The cause, for the operator: refused, reset, shutting down, or no connection in time.
            logger.warning("request refused: the database is unavailable", metadata: ["error": "\(redacted(error))"])
        } else {
            logger.log(
                level: problem.logLevel, "request refused", metadata: ["problem": "\(problem.problemType)", "detail": "\(problem.detail)"])
        }
        var headers = problem.headers
        headers[.contentLength] = String(problem.body.count)
        return Response(status: problem.status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: problem.body)))
    }

    static func apiError(for error: any Error) -> APIError {
        if DatabaseWords.isUnavailable((error as? ServerError)?.underlyingError ?? error) { return .databaseUnavailable }
        switch error {
        case let error as APIError:
            return error
        case let error as ValidationError:
            return .unprocessable(error)
        case let error as StoreError:
            return .from(error)
        case let error as ServerError:
            if let inner = error.underlyingError as? APIError { return inner }
            if let inner = error.underlyingError as? ValidationError { return .unprocessable(inner) }
            if let inner = error.underlyingError as? StoreError { return .from(inner) }
            // Only a request the generated code could not decode is the client's fault; a
            // decoding failure inside a handler (stored data) is ours.
            if let decoding = error.underlyingError as? DecodingError {
                return error.operationInput == nil ? .badRequest(describe(decoding)) : .internalError
            }
            if (400..<500).contains(error.httpStatus.code) {
                if error.httpStatus == .unsupportedMediaType {
                    // The one operation that takes forms (RFC 8058); every other body is JSON.
                    if error.operationID == "unsubscribe" {
                        return .unsupportedMediaType(
                            "Send the body as multipart/form-data or application/x-www-form-urlencoded (RFC 8058).")
                    }
                    return .unsupportedMediaType(
                        "This operation takes a JSON body: send it with Content-Type: application/json "
                            + "(curl -d sends application/x-www-form-urlencoded unless told).")
                }
                return .badRequest(plainCause(error.causeDescription, operation: error.operationID))
            }
            return .internalError
        case let error as HTTPError:
            switch error.status {
            case .notFound: return .notFound(resource: "route")
            case .methodNotAllowed: return .notFound(resource: "route")
            case .contentTooLarge: return .contentTooLarge(limit: nil)
            default: return error.status.code < 500 ? .badRequest(error.body ?? error.status.reasonPhrase) : .internalError
            }
        default:
            return .internalError
        }
    }

    /// What a log line may say about a failure: its kind and where it happened, never a value
    /// that came from the request (headers, body, query) or a credential.
    static func redacted(_ error: any Error) -> String {
        switch error {
        case let error as ServerError:
            return "operation \(error.operationID): \(redacted(error.underlyingError))"
        case let error as PostgresTransactionError:
            return redacted(error.closureError ?? error.beginError ?? error.commitError ?? error.rollbackError ?? CancellationError())
        case let error as PSQLError:
            let state = error.serverInfo?[.sqlState] ?? "-"
            let message = error.serverInfo?[.message] ?? ""
            return "PostgreSQL \(error.code) sqlstate=\(state) \(message)"
        case let error as DecodingError:
            let path: DecodingError.Context? =
                switch error {
                case .keyNotFound(_, let c), .typeMismatch(_, let c), .valueNotFound(_, let c), .dataCorrupted(let c): c
                @unknown default: nil
                }
            return "DecodingError at \(path?.codingPath.map(\.stringValue).joined(separator: ".") ?? "?")"
        case let error as UnmappableValue:
            return "\(error)"
        case let error as DatabaseUnavailable:
            return "\(error)"
        case let error as CommitOutcomeUnknown:
            return "\(error)"
        case let error as StoredValueError:
            return "\(error)"
        case let error as PostgresDecodingError:
            // The column and the Swift type, never `postgresData` (tenant data).
            return "PostgresDecodingError \(error.code) column=\(error.columnName) as \(error.targetType)"
        default:
            return "\(type(of: error))"
        }
    }

    /// The generated decoders' words for a value that is not what the contract says, in words
    /// for the integrator (they name Swift types and decoder internals).
    static func sentence(_ words: String, at path: String) -> String {
        if words.hasPrefix("Additional properties are disabled") {
            return "is not a field this operation takes (each field is in openapi.yaml; unknown ones are refused)."
        }
        if words.hasPrefix("The oneOf structure did not decode") {
            if path.range(of: #"conditions\[\d+\]$"#, options: .regularExpression) != nil {
                return "is not a condition: give \"field\" and \"op\", with \"value\" for equals, gte and lte, or \"values\" for in, "
                    + "not_in and weekday_in (monday … sunday, lowercase), and no other key."
            }
            return "matches none of the forms this field takes (see openapi.yaml)."
        }
        if path == "List-Unsubscribe" { return "must be One-Click (RFC 8058)." }
        if let range = words.range(of: "from invalid String value ") {
            return "\"\(words[range.upperBound...])\" is not a value this field takes (see openapi.yaml)."
        }
        // "Expected to decode Bool but found a string instead."
        // Foundation writes "found number" without an article for some kinds.
        if let match = words.wholeMatch(of: /Expected to decode (\w+)(<[^>]*>)? but found ((?:an? )?[\w ]+?)( value)? instead\./) {
            let wanted: String? =
                switch match.1 {
                case "Dictionary": "a JSON object"
                case "Array": "an array"
                case "String": "a string"
                case "Bool": "true or false"
                case "Int", "Int32", "Int64": "a whole number"
                case "Double", "Float": "a number"
                default: nil
                }
            let kind =
                match.3.hasPrefix("a ") || match.3.hasPrefix("an ")
                ? String(match.3) : ("aeiou".contains(match.3.first ?? "x") ? "an " : "a ") + match.3
            let found = kind == "a dictionary" ? "an object" : kind
            if let wanted { return "must be \(wanted), not \(found)." }
        }
        return words
    }

    /// The generator's words for a missing body or parameter, in the API's.
    static func plainCause(_ cause: String, operation: String? = nil) -> String {
        if cause.hasPrefix("Missing required request body") {
            // The one operation that takes forms (RFC 8058); every other body is JSON.
            return operation == "unsubscribe"
                ? "Send List-Unsubscribe=One-Click as multipart/form-data or application/x-www-form-urlencoded (RFC 8058)."
                : "Send a JSON body (Content-Type: application/json)."
        }
        let prefix = "Missing required query parameter named: "
        if cause.hasPrefix(prefix) { return "\(cause.dropFirst(prefix.count)): this query parameter is required." }
        return cause
    }

    /// For a required field missing from an object that has a field of a near name (one or two
    /// letters apart: `audiance` for `audience`), a sentence naming it; nil otherwise. The
    /// decoder stops at the missing field before it would refuse the unknown one.
    static func misspeltField(_ error: any Error, in body: ByteBuffer) -> String? {
        guard let decoding = (error as? ServerError)?.underlyingError as? DecodingError,
            case .keyNotFound(let key, let context) = decoding,
            let object = jsonValue(at: context.codingPath, in: body) as? [String: Any]
        else { return nil }
        let wanted = key.stringValue
        let near = object.keys.filter { $0 != wanted && editDistance($0, wanted, atMost: 2) <= 2 }.sorted()
        guard let first = near.first else { return nil }
        return " The body has \(shortJSON(first)): a misspelling of \"\(wanted)\"?"
    }

    /// The value at `path` in the JSON `body`; nil when the body or the path is not there.
    static func jsonValue(at path: [any CodingKey], in body: ByteBuffer) -> Any? {
        guard var value = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView), options: [.fragmentsAllowed]) else {
            return nil
        }
        for step in path {
            if let index = step.intValue, let array = value as? [Any], array.indices.contains(index) {
                value = array[index]
            } else if let object = value as? [String: Any], let member = object[step.stringValue] {
                value = member
            } else {
                return nil
            }
        }
        return value
    }

    /// For a preference condition the decoder could not read (it only knows none of the four
    /// forms matched), what is wrong with it, read off the body; nil for anything else.
    static func conditionProblem(_ error: any Error, in body: ByteBuffer) -> String? {
        guard let decoding = (error as? ServerError)?.underlyingError as? DecodingError else { return nil }
        let context: DecodingError.Context
        switch decoding {
        case .typeMismatch(_, let c), .valueNotFound(_, let c), .dataCorrupted(let c): context = c
        default: return nil
        }
        // The condition itself, or a member of it the decoder went into.
        guard let at = context.codingPath.lastIndex(where: { $0.intValue != nil }), at > 0,
            context.codingPath[at - 1].stringValue == "conditions"
        else { return nil }
        let path = Array(context.codingPath[...at])
        let name = path.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".").replacingOccurrences(
            of: ".[", with: "[")
        guard let condition = jsonValue(at: path, in: body) else { return nil }
        guard let object = condition as? [String: Any] else { return "\(name): must be an object with \"field\" and \"op\"." }
        let ops = ["equals", "in", "not_in", "weekday_in", "gte", "lte"]
        guard let op = object["op"] as? String else { return "\(name): needs an \"op\": \(ops.joined(separator: ", "))." }
        guard ops.contains(op) else { return "\(name): op \(shortJSON(op)) is not one of \(ops.joined(separator: ", "))." }
        guard let field = object["field"] as? String, !field.isEmpty else {
            return "\(name): needs a \"field\": a path such as payload.isq or recipient.attributes.team."
        }
        let takes = op == "equals" || op == "gte" || op == "lte" ? "value" : "values"
        if let extra = object.keys.sorted().first(where: { !["field", "op", takes].contains($0) }) {
            return "\(name): \(op) takes \"field\", \"op\" and \"\(takes)\", not \(shortJSON(extra))."
        }
        switch op {
        case "equals":
            if object["value"] == nil { return "\(name): equals needs a \"value\" (any JSON value, null included)." }
        case "gte", "lte":
            let value = object["value"]
            if value == nil || value is Bool || !(value is String || value is NSNumber) {
                return "\(name): \(op) takes a \"value\" that is a number, a date (2027-03-31), a date-time or \"today\"."
            }
        default:
            guard let values = object["values"] as? [Any], (1...100).contains(values.count) else {
                return "\(name): \(op) needs \"values\": a list of 1 to 100 values."
            }
            let days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
            if op == "weekday_in", let wrong = values.first(where: { !days.contains(($0 as? String) ?? "") }) {
                return "\(name): \(shortJSON(wrong)) is not a weekday: monday … sunday, lowercase."
            }
        }
        return nil
    }

    /// A value of the request as compact JSON, at most 60 characters: what a problem may quote
    /// of it (never the whole of a large value).
    static func shortJSON(_ value: Any) -> String {
        let data = try? JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed, .sortedKeys, .withoutEscapingSlashes])
        let text = data.flatMap { String(data: $0, encoding: .utf8) } ?? "a value"
        return text.count > 60 ? String(text.prefix(59)) + "…" : text
    }

    /// Levenshtein distance, giving up (returning `limit + 1`) once it exceeds `limit`.
    static func editDistance(_ a: String, _ b: String, atMost limit: Int) -> Int {
        let (a, b) = (Array(a.utf8), Array(b.utf8))
        guard abs(a.count - b.count) <= limit else { return limit + 1 }
        var previous = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(b.count, 1) where !b.isEmpty {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            if current.min()! > limit { return limit + 1 }
            previous = current
        }
        return previous[b.count]
    }

    /// A decoding failure in words a client can act on.
    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "body" : keys.joined(separator: ".").replacingOccurrences(of: ".[", with: "[")
        }
        switch error {
        case .keyNotFound(let key, let context):
            let parent = path(context)
            return "The request body is missing the required field \"\(key.stringValue)\"" + (parent == "body" ? "." : " in \(parent).")
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return "\(path(context)): \(sentence(context.debugDescription, at: path(context)))"
        case .dataCorrupted(let context):
            if context.underlyingError != nil, context.codingPath.isEmpty {
                return "The request body is not valid JSON."
            }
            // A value decoder (dates) knows the value, not where it stood: its message says it all.
            if context.codingPath.isEmpty { return context.debugDescription }
            return "\(path(context)): \(sentence(context.debugDescription, at: path(context)))"
        @unknown default:
            return "The request body is not valid."
        }
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-Id")!
    static let xFrameOptions = HTTPField.Name("X-Frame-Options")!
    static let forwardedFor = HTTPField.Name("X-Forwarded-For")!
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
}
