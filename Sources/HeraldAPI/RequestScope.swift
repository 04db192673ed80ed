import Foundation
import HeraldCore
import HeraldStore
import Logging

/// Who is calling: the organisation, the acting user or API key, and what they may do.
public struct Principal: Sendable, Equatable {
    public var organisationID: UUID
    public var actor: Actor
    public var permissions: Set<Permission>
}

/// What the HTTP layer knows about the request being served. The generated handlers do not
/// see Hummingbird's context, so `RequestMiddleware` binds this task-local around them.
struct RequestScope: Sendable {
    @TaskLocal static var current: RequestScope?

    var requestID: String
    var clientAddress: String?
    var principal: Principal?
    var logger: Logger

    /// The scope of the request this task serves; only missing outside a request (a bug).
    static func get() throws -> RequestScope {
        guard let scope = current else { throw APIError.internalError }
        return scope
    }

    /// The authenticated principal, or 401.
    func requirePrincipal() throws -> Principal {
        guard let principal else { throw APIError.unauthorized("This operation needs a bearer token or an API key.") }
        return principal
    }
}
