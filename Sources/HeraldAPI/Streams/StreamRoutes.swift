import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import Logging
import NIOCore

/// The live feed's routes, written by hand because the generator cannot express a stream; they
/// are in `openapi.yaml` all the same (`streamMyNotifications`, `openMyNotificationSocket`), and
/// `SkippingTransport` keeps the generated stubs of those two operations off the router.
///
/// Authentication is the boundary's, with one more credential: a single-use ticket in the query
/// (`?ticket=`, from `POST /v1/me/stream-tickets`) for browsers, whose `EventSource` and
/// `WebSocket` cannot send a header. The path is logged without its query, so a ticket never is.
struct StreamRoutes: Sendable {
    static let streamPath = "/v1/me/notifications/stream"
    static let socketPath = "/v1/me/notifications/socket"
    /// The operations the generated router must leave to these routes.
    static let handWritten: Set<String> = [streamPath, socketPath]

    let hub: StreamHub?
    let database: Database
    let authenticator: Authenticator
    /// Dropped for the user after a socket command changes their feed, as the API's writes do.
    var feedCache: FeedCache? = nil
    let now: @Sendable () -> Date
    /// Where the socket's upgrades are counted (`herald_http_requests_total`: 101 when it
    /// opens, or the status of its refusal's problem), as the router counts every request.
    var metrics: HTTPMetrics? = nil

    func register(on router: Router<HeraldRequestContext>) {
        router.get(RouterPath(stringLiteral: Self.streamPath)) { request, context in
            try await self.serverSentEvents(request, context: context)
        }
        registerSocketFallback(on: router)
    }

    /// `GET /v1/me/notifications/stream`: `text/event-stream`.
    func serverSentEvents(_ request: Request, context: HeraldRequestContext) async throws -> Response {
        let credential = RequestScope.current?.credential
        let lastEventID = request.headers[.lastEventID]
        let start = try await inChildTask { try await self.authenticate(request, credential: credential, lastEventID: lastEventID) }
        let hub = try runningHub()
        let registration = try openStream(start, on: hub)
        let session = FeedStreamSession(hub: hub, registration: registration, start: start, now: now, logger: context.logger)
        // A client that goes away is noticed at once, not at the next heartbeat's write: its
        // place (the per-user limit) is free again. The server allows half-closed connections,
        // so a client's FIN does not close the channel: a handler at the front of the pipeline
        // watches for it.
        // A connection that closes before the response is written never runs the body, whose
        // session closes the registration: the channel's close does it too (closing twice is
        // nothing), or the user's place would stay taken for the life of the process.
        let channel = context.channel
        channel.closeFuture.whenComplete { _ in
            registration.end(.clientGone)
            hub.close(registration)
        }
        channel.eventLoop.execute {
            try? channel.pipeline.syncOperations.addHandler(
                ClientGoneHandler { registration.end(.clientGone) }, name: ClientGoneHandler.name, position: .first)
        }
        var headers = HTTPFields()
        headers[.contentType] = "text/event-stream; charset=utf-8"
        headers[.cacheControl] = "no-store"
        // Proxies (nginx) must not buffer the stream.
        headers[HTTPField.Name("X-Accel-Buffering")!] = "no"
        let logger = context.logger
        return Response(
            status: .ok, headers: headers,
            body: ResponseBody { writer in
                await Self.pump(session, into: &writer, logger: logger)
                try? await writer.finish(nil)
                channel.eventLoop.execute { _ = channel.pipeline.syncOperations.removeHandler(name: ClientGoneHandler.name) }
            })
    }

    /// Runs the stream into the response body. Its frame stays for the life of the stream (see
    /// `FeedStreamSession.run`): it is not inlined into the body's closure, which captures little.
    @inline(never)
    static func pump(_ session: FeedStreamSession, into writer: inout any ResponseBodyWriter, logger: Logger) async {
        do {
            try await session.run { outputs in
                // One write (one flush) for everything a step produced.
                var buffer = ByteBuffer()
                for output in outputs { buffer.writeString(output.sse) }
                try await writer.write(buffer)
            }
        } catch {
            logger.debug("stream ended", metadata: ["error": "\(String(reflecting: error))"])
        }
    }

    func runningHub() throws -> StreamHub {
        guard let hub else { throw APIError.notReady("Live streams are not running on this instance.") }
        return hub
    }

    /// Registers the stream, or the problem the client gets instead.
    func openStream(_ start: StreamStart, on hub: StreamHub) throws -> StreamRegistration {
        do {
            return try hub.open(organisationID: start.organisationID, userID: start.userID, sessionID: start.sessionID)
        } catch .tooManyForUser(let limit) {
            throw APIError.tooManyRequests(
                "This user already has \(limit) open streams, the most allowed; close one (or reuse it across tabs).", retryAfter: 5)
        } catch .instanceFull {
            throw APIError.tooManyRequests("This instance holds as many streams as it may; try again shortly.", retryAfter: 5)
        } catch .shuttingDown {
            throw APIError.notReady("This instance is shutting down; reconnect.")
        }
    }

    /// Who the stream is for and where it starts. `ticket` and `since` are the only query
    /// parameters; `Last-Event-ID` (an EventSource reconnecting) wins over `since`.
    func authenticate(_ request: Request, credential: Credential?, lastEventID: String?) async throws -> StreamStart {
        let query = request.uri.queryParameters
        let accepted: Set<String> = ["ticket", "since"]
        if let unknown = query.map({ String($0.key) }).sorted().first(where: { !accepted.contains($0) }) {
            throw APIError.badRequest("Unknown query parameter \"\(unknown)\". This operation takes: since, ticket.")
        }
        let since =
            try lastEventID.map { try Self.since($0, named: "Last-Event-ID") }
            ?? query["since"].map { try Self.since(String($0), named: "since") }
        let requestID = RequestScope.current?.requestID
        if let text = query["ticket"].map(String.init) {
            let refused = APIError.unauthorized("The stream ticket is not valid (each works once, for about a minute); ask for a new one.")
            guard let ticket = OpaqueToken(parsing: text, kind: .streamTicket) else { throw refused }
            return try await database.withTenant(ticket.organisationID, requestID: requestID) { tx in
                guard let holder = try await tx.redeemStreamTicket(id: ticket.id, secretHash: ticket.secretHash, now: now()) else {
                    throw refused
                }
                let access = VerifiedAccess(organisationID: ticket.organisationID, userID: holder.userID, sessionID: holder.sessionID)
                try await check(access, in: tx)
                return StreamStart(
                    organisationID: ticket.organisationID, userID: holder.userID, sessionID: holder.sessionID, since: since)
            }
        }
        guard let credential else {
            throw APIError.unauthorized("This stream needs a bearer token, or a ticket (?ticket=) from POST /v1/me/stream-tickets.")
        }
        return try await database.withTenant(
            credential.organisationID, actor: credential.actor, requestID: requestID, admitting: credential.admission
        ) { tx in
            switch credential {
            case .apiKey:
                // The key is checked first, so a bad key is still a 401, and a key without
                // notifications.read a 403, as on the feed's other routes.
                let principal = try await authenticator.principal(for: credential, in: tx)
                guard principal.permissions.contains(.notificationsRead) else { throw APIError.forbidden(.notificationsRead) }
                throw APIError.badRequest(
                    "This operation concerns the calling user's own data; call it with a user's access token, not an API key.")
            case .accessToken(let access):
                try await check(access, in: tx)
                return StreamStart(
                    organisationID: access.organisationID, userID: access.userID, sessionID: access.sessionID, since: since)
            }
        }
    }

    /// The user may read their feed, and the session the credential came from is still live.
    private func check(_ access: VerifiedAccess, in tx: TenantTransaction) async throws {
        let principal = try await authenticator.principal(for: .accessToken(access), in: tx)
        guard principal.permissions.contains(.notificationsRead) else { throw APIError.forbidden(.notificationsRead) }
        try await tx.requireLiveSession(access.sessionID, of: access.userID, now: now())
    }

    /// A resume point: a 400 naming the parameter (or header) when it is not one, as every other
    /// query parameter the contract types is refused.
    static func since(_ text: String, named name: String) throws -> Int64 {
        guard let value = Int64(text.trimmingCharacters(in: .whitespaces)), value >= 0 else {
            let shown = text.count > 40 ? "\"\(text.prefix(40))…\"" : "\"\(text)\""
            throw APIError.badRequest("\(name): \(shown) is not an event id this stream sent (a whole number, 0 or more).")
        }
        return value
    }
}

extension TenantTransaction {
    /// A 401 when the session a credential came from has ended (signed out, or ended with a
    /// deactivation): a stream is refused then, and so is a ticket for one. No session: nothing.
    func requireLiveSession(_ session: UUID?, of user: UUID, now: Date) async throws {
        if let session, !(try await sessionIsLive(session, of: user, now: now)) {
            throw APIError.sessionEnded
        }
    }
}

/// Tells a stream its client has gone: the input closed (a FIN) or the channel went inactive.
final class ClientGoneHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    static let name = "herald-stream-client-gone"
    let gone: @Sendable () -> Void

    init(_ gone: @escaping @Sendable () -> Void) { self.gone = gone }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { gone() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        gone()
        context.fireChannelInactive()
    }
}

extension StreamOutput {
    /// Server-Sent Events framing: `retry:` hints, events, and comment lines as heartbeats.
    var sse: String {
        switch self {
        case .retry(let milliseconds): "retry: \(milliseconds)\n\n"
        case .event(let event): event.sse
        case .heartbeat: ": heartbeat\n\n"
        }
    }
}

extension HTTPField.Name {
    static var lastEventID: Self { .init("Last-Event-ID")! }
}
