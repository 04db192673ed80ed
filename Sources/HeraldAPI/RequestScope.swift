import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Logging
import Synchronization

/// Who is calling: the organisation, the acting user or API key, and what they may do.
public struct Principal: Sendable, Equatable {
    public var organisationID: UUID
    public var actor: Actor
    public var permissions: Set<Permission>
}

/// What the HTTP layer knows about the request being served. The generated handlers do not
/// see Hummingbird's context, so the boundary binds this task-local around them:
/// `RequestMiddleware` with the request id and the credential, `TenantBoundary` with the
/// principal and the request's one tenant transaction.
struct RequestScope: Sendable {
    @TaskLocal static var current: RequestScope?

    var requestID: String
    var clientAddress: String?
    /// The checked `Authorization` credential (signature, form), before the database has
    /// said what it may do; nil without the header.
    var credential: Credential?
    /// The credential resolved in the request's transaction; nil on public operations.
    var principal: Principal?
    /// The claims of a signed link, on the link operations.
    var link: LinkClaims?
    /// The request's one tenant transaction, on operations that have a credential.
    var transaction: TransactionLoan?
    var logger: Logger
    /// A HEAD request, served as its GET without the body: a tracked link counts no click.
    var head = false
    /// The organisation's rate as counted for this request, for a problem's answer too (a success
    /// carries it from the boundary; a thrown error leaves it here for the middleware).
    let rateLimit = RateLimitNote()

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

/// The `RateLimit` headers of one request, set once its rate is counted.
final class RateLimitNote: Sendable {
    private let fields = Mutex<HTTPFields>([:])
    func set(_ headers: HTTPFields) { fields.withLock { $0 = headers } }
    var headers: HTTPFields { fields.withLock { $0 } }
}
