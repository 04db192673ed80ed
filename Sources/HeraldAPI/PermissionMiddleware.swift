import Foundation
import HeraldCore
import HeraldStore
import Logging
import HTTPTypes
import OpenAPIRuntime

/// Enforces `RoutePermissions.table` for every generated operation, before the body is decoded.
/// An operation without an entry is refused: a new route cannot go out unprotected by accident.
struct PermissionMiddleware: ServerMiddleware {
    func intercept(
        _ request: HTTPRequest,
        body: HTTPBody?,
        metadata: ServerRequestMetadata,
        operationID: String,
        next: @Sendable (HTTPRequest, HTTPBody?, ServerRequestMetadata) async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        guard let rule = RoutePermissions.table[operationID] else {
            try RequestScope.get().logger.critical("operation has no access rule", metadata: ["operation": "\(operationID)"])
            throw APIError.internalError
        }
        switch rule {
        case .public:
            break
        case .authenticated:
            _ = try RequestScope.get().requirePrincipal()
        case .permission(let permission):
            let principal = try RequestScope.get().requirePrincipal()
            guard principal.permissions.contains(permission) else { throw APIError.forbidden(permission) }
        }
        // A mistyped filter must not silently return everything (issue 8).
        if let name = SpecRoutes.undeclaredQueryParameter(operationID: operationID, path: request.path ?? "") {
            let accepted = SpecRoutes.byOperationID[operationID]?.query.sorted() ?? []
            throw APIError.badRequest("Unknown query parameter \"\(name)\". "
                + (accepted.isEmpty ? "This operation takes none." : "This operation takes: \(accepted.joined(separator: ", "))."))
        }
        // What the contract declares, the server enforces: the generated decoder checks types,
        // not lengths, so every maxLength/maxItems of the body is checked here, by the table
        // scripts/spec-routes.py writes from openapi.yaml.
        var body = body
        if let route = SpecRoutes.byOperationID[operationID], !route.limits.isEmpty, let received = body {
            let data = try await Data(collecting: received, upTo: .max)
            if let json = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]),
               let violation = route.lengthViolation(in: json) {
                throw APIError.unprocessable(violation)
            }
            body = HTTPBody(data)
        }
        return try await next(request, body, metadata)
    }
}
