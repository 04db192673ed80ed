import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Logging
import OpenAPIRuntime

/// The request boundary of every generated operation, before its body is decoded:
///
/// 1. the operation's rule from `RoutePermissions.table` (none → refused: a new route cannot
///    go out unprotected by accident);
/// 2. for a credential (`Authorization`, or a signed link in the path), ONE tenant transaction
///    in the credential's organisation: the grant is read in it, the permission checked, and
///    the handler's statements run in it (`HeraldService.tenant`), committed when the handler
///    returns and rolled back when it throws;
/// 3. on `/v1/me/notifications…` the transaction is confined to the caller's own in-app rows
///    (row-level security on `app.recipient_id`), so no feed handler can forget it;
/// 4. the contract's checks (`ContractChecks`: query parameters, lengths, nulls), then the
///    operation.
///
/// Errors are not translated here: `RequestMiddleware` maps every error to problem+json.
struct TenantBoundary: ServerMiddleware {
    let database: Database
    let authenticator: Authenticator
    let linkKeys: LinkKeyRing
    let contract: ContractChecks
    /// Per-organisation request rates; nil: none.
    let rateLimits: OrganisationRateLimits?
    /// The bell's reads kept per user for a few seconds; nil: none.
    let feedCache: FeedCache?
    /// Each organisation's requests in the database at once.
    let gate: OrganisationGate
    let now: @Sendable () -> Date

    func intercept(
        _ request: HTTPRequest,
        body: HTTPBody?,
        metadata: ServerRequestMetadata,
        operationID: String,
        next: @Sendable (HTTPRequest, HTTPBody?, ServerRequestMetadata) async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        let scope = try RequestScope.get()
        // The operation, after the contract's checks (`ContractChecks`) on the request.
        func proceed() async throws -> (HTTPResponse, HTTPBody?) {
            try await next(request, try await contract.checked(request, body: body, operationID: operationID), metadata)
        }
        guard let rule = RoutePermissions.table[operationID] else {
            scope.logger.critical("operation has no access rule", metadata: ["operation": "\(operationID)"])
            throw APIError.internalError
        }
        if case .public = rule {
            if let linkScope = RoutePermissions.signedLinks[operationID] {
                return try await signedLink(linkScope, scope: scope, metadata: metadata, proceed)
            }
            return try await proceed()
        }
        guard let credential = scope.credential else {
            throw APIError.unauthorized("This operation needs a bearer token or an API key.")
        }
        if case .accessToken(let access) = credential { try await requireLiveSession(access) }
        // A proven credential of an organisation over its rate is refused here, without a connection.
        let early = rateLimits?.takeEarly(credential, operationID: operationID, now: now())
        if let early, let decision = early, !decision.allowed { throw APIError.rateLimited(decision) }
        // The bell's reads from the cache (FeedCache): only for a caller whose credential this
        // instance has proven, when rate limits are on, since a hit does not enter the database.
        func authenticate() async throws -> (HTTPResponse, HTTPBody?) {
            try await authenticated(credential, rule: rule, early: early, operationID: operationID, request: request, scope: scope, proceed)
        }
        guard let feedCache else { return try await authenticate() }
        guard request.method == .get, FeedCache.keeps(operationID: operationID, target: request.path ?? ""),
            case .accessToken(let access) = credential, rateLimits == nil || early != nil
        else {
            let answer = try await authenticate()
            // What may have written drops entries before its answer leaves.
            if request.method != .get, request.method != .head {
                feedCache.wrote(organisationID: credential.organisationID, by: credential.actor.userID, path: request.path ?? "")
            }
            return answer
        }
        let key = FeedCache.Key(organisationID: access.organisationID, userID: access.userID, target: request.path ?? "")
        let ticket: UInt64
        switch await feedCache.begin(key) {
        case .hit(let entry):
            var response = entry.response
            if let early, let limit = early { response.headerFields.append(contentsOf: limit.headers) }
            return (response, HTTPBody(entry.body))
        case .read(let given, _):
            ticket = given
        }
        do {
            let (response, body) = try await authenticate()
            // Only a complete answer of known, modest size is kept; any other passes through.
            guard response.status == .ok, let body, case .known(let length) = body.length, length <= feedCache.maxBytes / 64 else {
                feedCache.finish(key, ticket: ticket, response: nil)
                return (response, body)
            }
            let bytes = try await [UInt8](collecting: body, upTo: Int(length))
            // Its limit headers are not kept: a hit gets its own.
            var kept = response
            kept.headerFields[.rateLimit] = nil
            kept.headerFields[.rateLimitPolicy] = nil
            feedCache.finish(key, ticket: ticket, response: (kept, bytes))
            return (response, HTTPBody(bytes))
        } catch {
            feedCache.finish(key, ticket: ticket, response: nil)
            throw error
        }
    }

    /// The credential's one tenant transaction: its grant read, its rate counted, its permission
    /// checked, and the operation run in it.
    private func authenticated(
        _ credential: Credential, rule: AccessRule, early: RateLimitDecision??, operationID: String, request: HTTPRequest,
        scope: RequestScope, _ proceed: () async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        let ownFeed = RoutePermissions.isOwnFeed(operationID)
        return try await admitted(credential, ownFeed: ownFeed) {
            if let answer = try await bellRead(credential, rule: rule, early: early, operationID: operationID, request: request) {
                return answer
            }
            // A refusal before the operation runs is answered once the transaction commits: it
            // wrote nothing but the key's use, which an administrator looking for keys still in
            // use must see (a trial's key, refused four times, looked unused).
            let answer: Result<(HTTPResponse, HTTPBody?), APIError> = try await database.withTenant(
                credential.organisationID, actor: credential.actor, requestID: scope.requestID,
                recipient: ownFeed ? credential.actor.userID : nil, admitting: credential.admission
            ) { tx in
                let principal = try await authenticator.principal(for: credential, in: tx)
                // Counted once the credential is proven (a forged key cannot spend an organisation's
                // rate), before the operation's work.
                let limit: RateLimitDecision?
                if let early {
                    limit = early
                } else {
                    limit = try await rateLimits?.take(credential.organisationID, operationID: operationID, now: now()) {
                        try await tx.rateLimitSettings()
                    }
                }
                // On every request, so a key in constant use stays proven (refused early when
                // over its rate, in its organisation's lane of the gate).
                rateLimits?.proven(credential, now: now())
                if let limit, !limit.allowed { return .failure(APIError.rateLimited(limit)) }
                // A refusal below (a 403, a handler's 4xx) carries the rate too (RequestMiddleware).
                if let limit { scope.rateLimit.set(limit.headers) }
                if case .permission(let permission) = rule, !principal.permissions.contains(permission) {
                    return .failure(APIError.forbidden(permission))
                }
                // An API key has no feed: refused before any handler could run unconfined.
                if ownFeed, credential.actor.userID == nil {
                    return .failure(
                        APIError.badRequest(
                            "This operation concerns the calling user's own data; call it with a user's access token, not an API key."))
                }
                var bound = scope
                bound.principal = principal
                var (response, body) = try await Self.run(proceed, in: tx, scope: bound)
                if let limit { response.headerFields.append(contentsOf: limit.headers) }
                return .success((response, body))
            }
            return try answer.get()
        }
    }

    /// A 401 when the session `access` was issued with has ended (`SessionLiveness`): signed out,
    /// its refresh token used twice, or its user deactivated. The streams check the same.
    private func requireLiveSession(_ access: VerifiedAccess) async throws {
        let now = now()
        let live = try await authenticator.tokens.sessions.isLive(access, now: now) { session in
            try await database.withTenant(access.organisationID) { tx in try await tx.sessionIsLive(session, of: access.userID, now: now) }
        }
        if !live { throw APIError.sessionEnded }
    }

    /// The bell's reads in one statement (`BellReads`): for a user's access token whose rate, when
    /// there are rate limits, this instance has already counted (`takeEarly`); nil for any other
    /// request, and for a read the database did not admit (the general path says why). The
    /// database checks the permission of the operation's rule, as the general path would.
    private func bellRead(
        _ credential: Credential, rule: AccessRule, early: RateLimitDecision??, operationID: String, request: HTTPRequest
    ) async throws -> (HTTPResponse, HTTPBody?)? {
        guard case .accessToken(let access) = credential, case .permission(let permission) = rule, rateLimits == nil || early != nil,
            let read = BellReads.read(operationID: operationID, request: request),
            let answer = try await BellReads.answer(read, for: access, permission: permission, database: database, now: now())
        else { return nil }
        rateLimits?.proven(credential, now: now())
        var response = answer.0
        if let early, let limit = early { response.headerFields.append(contentsOf: limit.headers) }
        return (response, answer.1)
    }

    /// `body` once the credential's organisation has a place in the gate, in the lane of the
    /// request's kind: its users' own feed, its other calls, or calls with a key not yet proven.
    private func admitted<Result>(
        _ credential: Credential, ownFeed: Bool, _ body: () async throws -> Result
    ) async throws -> Result {
        let kind: OrganisationGate.LaneKey.Kind
        switch credential {
        case .accessToken: kind = ownFeed ? .ownFeed : .calls
        case .apiKey: kind = rateLimits?.isProven(credential, now: now()) == true ? .calls : .unproven
        }
        return try await gate.run(.init(organisationID: credential.organisationID, kind: kind), body)
    }

    /// A signed link's token is the credential: it names the organisation and the user the
    /// message went to. Any failure (bad token, a row gone since) is the same 404.
    private func signedLink(
        _ linkScope: LinkScope, scope: RequestScope, metadata: ServerRequestMetadata,
        _ next: () async throws -> (HTTPResponse, HTTPBody?)
    ) async throws -> (HTTPResponse, HTTPBody?) {
        guard let token = metadata.pathParameters["token"],
            let claims = linkKeys.verify(String(token), scope: linkScope, now: now())
        else {
            throw APIError.notFound(resource: "link")
        }
        let answer: (HTTPResponse, HTTPBody?)
        do {
            // Not through the organisation gate: a mail client's one-click unsubscribe (RFC 8058)
            // does not retry a 429, and only this deployment's signatures get here.
            answer = try await database.withTenant(claims.organisationID, actor: .user(claims.userID), requestID: scope.requestID) { tx in
                var bound = scope
                bound.link = claims
                return try await Self.run(next, in: tx, scope: bound)
            }
        } catch StoreError.notFound {
            throw APIError.notFound(resource: "link")
        }
        // A link may change what the user's feed shows (a click marks its row read); a HEAD does not.
        if !scope.head { feedCache?.invalidate(organisationID: claims.organisationID) }
        return answer
    }

    /// Runs the operation with `scope` bound and `tx` lent to it for as long as it runs.
    private static func run(
        _ operation: () async throws -> (HTTPResponse, HTTPBody?), in tx: TenantTransaction, scope: RequestScope
    ) async throws -> (HTTPResponse, HTTPBody?) {
        try await tx.lend { loan in
            var bound = scope
            bound.transaction = loan
            return try await RequestScope.$current.withValue(bound) { try await operation() }
        }
    }
}
