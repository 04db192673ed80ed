import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Hummingbird
import HummingbirdWebSocket
import Logging
import NIOCore
import NIOWebSocket

/// The context of a WebSocket upgrade request (the socket has its own small router; a plain GET
/// of the same path reaches the main router and is answered 426).
struct StreamSocketContext: RequestContext, WebSocketRequestContext {
    var coreContext: CoreRequestContextStorage
    let webSocket: WebSocketHandlerReference<Self>

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        webSocket = .init()
    }
}

/// A command a client sends on the socket (`StreamSocketCommand` in openapi.yaml).
struct StreamSocketCommand: Decodable {
    enum Name: String, Decodable {
        case markRead = "mark_read"
        case markUnread = "mark_unread"
        case archive
        case markAllRead = "mark_all_read"
    }
    var command: Name
    var id: String?
}

extension StreamRoutes {
    /// The upgrade router: every upgrade of the socket path is accepted, and the credential is
    /// checked on the socket, so that a refusal reaches a browser (which never sees the status
    /// of a failed handshake) as an `error` message with the problem, then a close code of
    /// 4000 + the HTTP status (4400, 4401, 4403, 4429, 4503).
    func webSocketRouter() -> Router<StreamSocketContext> {
        let router = Router(context: StreamSocketContext.self)
        router.ws(RouterPath(stringLiteral: Self.socketPath)) { inbound, outbound, context in
            await self.socket(request: context.request, inbound: inbound, outbound: outbound, logger: context.logger)
        }
        return router
    }

    /// A plain GET of the socket's path (no `Upgrade: websocket`).
    func registerSocketFallback(on router: Router<HeraldRequestContext>) {
        router.get(RouterPath(stringLiteral: Self.socketPath)) { request, _ -> Response in
            // Like every operation that needs a credential: none at all is a 401.
            if RequestScope.current?.credential == nil, request.uri.queryParameters["ticket"] == nil {
                throw APIError.unauthorized("This socket needs a bearer token, or a ticket (?ticket=) from POST /v1/me/stream-tickets.")
            }
            var headers: HTTPFields = [.contentType: "application/problem+json", .upgrade: "websocket"]
            let body = Data(
                ("{\"type\":\"https://herald.dev/problems/upgrade-required\",\"title\":\"Upgrade Required\",\"status\":426,"
                    + "\"detail\":\"This path is a WebSocket: send Upgrade: websocket (or use the Server-Sent Events stream at "
                    + "\(Self.streamPath)).\"}").utf8)
            headers[.contentLength] = String(body.count)
            return Response(status: .upgradeRequired, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: body)))
        }
    }

    func socket(request: Request, inbound: WebSocketInboundStream, outbound: WebSocketOutboundWriter, logger: Logger) async {
        let session: FeedStreamSession
        let started = ContinuousClock.now
        func count(_ status: Int) {
            metrics?.record(method: "GET", route: Self.socketPath, status: status, duration: ContinuousClock.now - started)
        }
        do {
            let hub = try runningHub()
            let start = try await inChildTask {
                let credential = try await authenticator.credential(from: request.headers[.authorization], logger: logger)
                return try await authenticate(request, credential: credential, lastEventID: nil)
            }
            session = FeedStreamSession(hub: hub, registration: try openStream(start, on: hub), start: start, now: now, logger: logger)
            count(101)
        } catch {
            let problem = RequestMiddleware.apiError(for: error)
            count(Int(problem.status.code))
            if problem == .internalError { logger.error("socket refused", metadata: ["error": "\(String(reflecting: type(of: error)))"]) }
            try? await outbound.write(.text(Self.refusal(problem, ref: nil)))
            try? await outbound.close(.unknown(4000 + UInt16(problem.status.code)), reason: String(problem.detail.prefix(120)))
            return
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                do {
                    try await session.run { outputs in
                        for output in outputs {
                            switch output {
                            case .event(let event): try await outbound.write(.text(event.websocket))
                            case .heartbeat: try await outbound.write(.custom(.init(fin: true, opcode: .ping, data: ByteBuffer())))
                            case .retry: break
                            }
                        }
                    }
                } catch {
                    logger.debug("socket stream ended", metadata: ["error": "\(String(reflecting: error))"])
                }
                try? await outbound.close(.normalClosure, reason: nil)
            }
            group.addTask {
                do {
                    for try await message in inbound.messages(maxSize: Self.socketFrameLimit) {
                        guard case .text(let text) = message else { continue }
                        let answer =
                            text.utf8.count > Self.commandLimit
                            ? Self.refusal(
                                APIError.contentTooLarge(limit: Self.commandLimit), ref: nil)
                            : await self.command(text, of: session.start)
                        try await outbound.write(.text(answer))
                    }
                } catch {
                    logger.debug("socket input ended", metadata: ["error": "\(String(reflecting: error))"])
                }
            }
            // Either side ending ends the socket.
            await group.next()
            group.cancelAll()
        }
    }

    /// A command is at most 16 KiB (a mark_read is about a hundred bytes). A message up to
    /// `socketFrameLimit` is answered with an `error` when longer; past that, the socket closes
    /// with 1009 (message too big).
    static let commandLimit = 16 * 1024
    static let socketFrameLimit = 64 * 1024

    /// The `error` message for a refused command.
    static func refusal(_ problem: APIError, ref: String?) -> String {
        "{\"event\":\"error\",\"problem\":\(String(decoding: problem.body, as: UTF8.self))\(ref.map { ",\"ref\":\($0)" } ?? "")}"
    }

    /// Runs one command in a transaction confined to the user's rows; the answer is an `ack`
    /// or an `error` with the problem, carrying the command's `ref`. The changes themselves
    /// come back as events, on this socket and every other stream of the user.
    func command(_ text: String, of start: StreamStart) async -> String {
        // The answer's `ref`, JSON-encoded; left out when the command has none (no field of a
        // message is null). Read before the command, so that a refused command is answered by it too.
        var ref: String?
        do {
            let usage =
                "A command is {\"command\": \"mark_read\"|\"mark_unread\"|\"archive\"|\"mark_all_read\", \"id\": \"<notification id>\", \"ref\": \"…\"}."
            let data = Data(text.utf8)
            guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw APIError.badRequest(usage) }
            if let given = object["ref"] {
                guard let given = given as? String else { throw APIError.badRequest("ref: must be a string.") }
                guard given.unicodeScalars.count <= 100 else {
                    throw APIError.unprocessable(ValidationError(field: "ref", message: "is longer than 100 characters."))
                }
                ref = try FeedStreamSession.json(given)
            }
            // `StreamSocketCommand` is closed (additionalProperties: false), as the HTTP bodies are.
            if let unknown = object.keys.filter({ !["command", "id", "ref"].contains($0) }).sorted().first {
                throw APIError.badRequest("Unknown field \"\(unknown)\" in a command. \(usage)")
            }
            let command: StreamSocketCommand
            do {
                command = try JSONDecoder().decode(StreamSocketCommand.self, from: data)
            } catch {
                throw APIError.badRequest(usage)
            }
            let now = now()
            // A malformed id is a 422 naming it, as in the REST body (`ids`).
            let target: UUID? = try command.id.map { text throws(ValidationError) in try Validate.uuid(text, field: "id") }
            if command.command == .markAllRead, target != nil {
                // As the REST route refuses ids with "all": a client that meant one row must
                // not clear the whole badge.
                throw APIError.unprocessable(
                    ValidationError(
                        field: "id", message: "is not taken by mark_all_read, which marks every row read; send mark_read for one row."))
            }
            try await database.withTenant(start.organisationID, actor: .user(start.userID), recipient: start.userID) { tx in
                switch (command.command, target) {
                case (.markAllRead, _): // with an id: refused above
                    try await tx.markAllRead(of: start.userID, through: TimeOrderedID.upperBound(at: now))
                case (.markRead, let id?):
                    _ = try await tx.setRead(id, of: start.userID, read: true, now: now)
                case (.markUnread, let id?):
                    _ = try await tx.setRead(id, of: start.userID, read: false, now: now)
                case (.archive, let id?):
                    _ = try await tx.archive(id, of: start.userID, now: now)
                case (.markRead, nil), (.markUnread, nil), (.archive, nil):
                    throw APIError.unprocessable(ValidationError(field: "id", message: "is required by \(command.command.rawValue)."))
                }
            }
            // A read after the ack sees the change here without waiting for the bus.
            feedCache?.invalidate(organisationID: start.organisationID, users: [start.userID])
            return "{\"event\":\"ack\"\(ref.map { ",\"ref\":\($0)" } ?? "")}"
        } catch {
            let problem = RequestMiddleware.apiError(for: error)
            if problem == .internalError {
                hub?.logger.error("socket command failed", metadata: ["error": "\(String(reflecting: type(of: error)))"])
            }
            return Self.refusal(problem, ref: ref)
        }
    }
}
