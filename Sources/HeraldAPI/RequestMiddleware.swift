import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import Logging
import NIOCore
import OpenAPIRuntime

/// The one boundary every request crosses: request id, body limit, authentication, the
/// task-local scope the handlers read, problem+json for every error, one log line, metrics.
struct RequestMiddleware: RouterMiddleware {
    typealias Context = HeraldRequestContext

    let authenticator: Authenticator
    let maxBodyBytes: Int
    let metrics: HTTPMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        let requestID = Self.requestID(from: request.headers[.requestID])
        var logger = context.logger
        logger[metadataKey: "request_id"] = "\(requestID)"
        var response: Response
        do {
            var request = request
            if let length = request.headers[.contentLength].flatMap(Int.init), length > maxBodyBytes {
                throw APIError.contentTooLarge(limit: maxBodyBytes)
            }
            do {
                _ = try await request.collectBody(upTo: maxBodyBytes)
            } catch let error as HTTPError where error.status == .contentTooLarge {
                throw APIError.contentTooLarge(limit: maxBodyBytes)
            }
            let principal = try await authenticator.authenticate(authorization: request.headers[.authorization], logger: logger)
            if let principal {
                logger[metadataKey: "organisation_id"] = "\(principal.organisationID.uuidString.lowercased())"
                logger[metadataKey: "actor"] = "\(principal.actor.kind):\(principal.actor.id?.uuidString.lowercased() ?? "-")"
            }
            let scope = RequestScope(
                requestID: requestID, clientAddress: context.remoteAddress?.ipAddress, principal: principal, logger: logger)
            response = try await RequestScope.$current.withValue(scope) {
                try await next(request, context)
            }
        } catch {
            response = Self.problemResponse(for: error, request: request, logger: logger)
        }
        response.headers[.requestID] = requestID
        // The generated code percent-encodes header values (URI "simple" style), which turns a
        // redirect's absolute URL into one opaque token; Location is a URI already (RFC 9110).
        if let location = response.headers[.location], location.contains("%3A%2F%2F") {
            response.headers[.location] = location.removingPercentEncoding ?? location
        }
        let elapsed = ContinuousClock.now - started
        let route = context.endpointPath ?? "unmatched"
        metrics.record(method: request.method.rawValue, route: route, status: response.status.code, duration: elapsed)
        logger.info("request", metadata: [
            "method": "\(request.method.rawValue)", "path": "\(request.uri.path)", "route": "\(route)",
            "status": "\(response.status.code)", "duration_ms": "\(Double(elapsed.nanoseconds) / 1_000_000)",
        ])
        return response
    }

    /// A client's `X-Request-Id` if it is short and plain, else a fresh one.
    static func requestID(from header: String?) -> String {
        if let header, (1...64).contains(header.count),
           header.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) {
            return header
        }
        return UUID().uuidString.lowercased()
    }

    /// Maps any error to a problem+json response. Internal details go to the log, never the client.
    static func problemResponse(for error: any Error, request: Request, logger: Logger) -> Response {
        var problem = apiError(for: error)
        if problem == .notFound(resource: "route") { problem = .noRoute(method: request.method.rawValue, path: request.uri.path) }
        if problem == .internalError {
            logger.error("request failed", metadata: ["error": "\(String(reflecting: error))"])
        } else {
            logger.log(level: problem.logLevel, "request refused", metadata: ["problem": "\(problem.problemType)", "detail": "\(problem.detail)"])
        }
        var headers = problem.headers
        headers[.contentLength] = String(problem.body.count)
        return Response(status: problem.status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: problem.body)))
    }

    static func apiError(for error: any Error) -> APIError {
        switch error {
        case let error as APIError:
            return error
        case let error as ValidationError:
            return .unprocessable(error)
        case let error as ServerError:
            if let inner = error.underlyingError as? APIError { return inner }
            if let inner = error.underlyingError as? ValidationError { return .unprocessable(inner) }
            if let decoding = error.underlyingError as? DecodingError { return .badRequest(describe(decoding)) }
            if (400..<500).contains(error.httpStatus.code) {
                if error.httpStatus == .unsupportedMediaType { return .badRequest("Send the body as application/json.") }
                return .badRequest(error.causeDescription)
            }
            return .internalError
        case let error as HTTPError:
            switch error.status {
            case .notFound: return .notFound(resource: "route")
            case .methodNotAllowed: return .badRequest("This method is not allowed on this path.")
            case .contentTooLarge: return .internalError
            default: return error.status.code < 500 ? .badRequest(error.body ?? error.status.reasonPhrase) : .internalError
            }
        default:
            return .internalError
        }
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
            return "\(path(context)): \(context.debugDescription)"
        case .dataCorrupted(let context):
            if context.underlyingError != nil, context.codingPath.isEmpty {
                return "The request body is not valid JSON."
            }
            return "\(path(context)): \(context.debugDescription)"
        @unknown default:
            return "The request body is not valid."
        }
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-Id")!
}
