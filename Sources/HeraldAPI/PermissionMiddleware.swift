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
        return try await next(request, body, metadata)
    }
}
