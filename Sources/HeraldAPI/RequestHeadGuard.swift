import Foundation
import HeraldCore
import Hummingbird
import HummingbirdCore
import HummingbirdWebSocket
import Logging
import NIOCore
import NIOHTTP1

/// Answers what arrives before a connection's first request is read, which Hummingbird's
/// WebSocket-upgrading pipeline leaves to no one (a trial): a request whose header fields are
/// larger than the decoder takes (80 KiB), or that the decoder cannot read, got no answer and its
/// connection stayed open for good, past the idle timeout (installed only once a request is
/// read) and past a graceful shutdown, which waited for it. So does a client that never finishes
/// its first request's head. This child channel puts `RequestHeadGuard` behind the upgrade
/// handler: a parser error is answered with a problem (431 for header fields too large, else 400)
/// and the connection closed; a head not read within the idle timeout closes it. Once the first
/// request is negotiated (its head read) the guard leaves the pipeline, and Hummingbird's own
/// handling takes over.
struct GuardedChildChannel: ServerChildChannel {
    typealias Value = HTTP1WebSocketUpgradeChannel.Value
    let base: HTTP1WebSocketUpgradeChannel
    let headTimeout: TimeAmount

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        base.setup(channel: channel, logger: logger).flatMapThrowing { value in
            let pipeline = channel.pipeline.syncOperations
            let upgrader = try pipeline.handler(type: NIOTypedHTTPServerUpgradeHandler<HTTP1WebSocketUpgradeChannel.UpgradeResult>.self)
            let guardian = RequestHeadGuard(timeout: headTimeout, logger: logger)
            try pipeline.addHandler(guardian)
            // Once the first request is negotiated (HTTP, or a WebSocket whose frames are no
            // HTTP parts), Hummingbird's handlers take over: the guard leaves before anything
            // the negotiation held back reaches it.
            upgrader.upgradeResultFuture.whenComplete { _ in
                channel.pipeline.syncOperations.removeHandler(guardian, promise: nil)
            }
            return value
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

final class RequestHeadGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let timeout: TimeAmount
    private let logger: Logger
    private var deadline: Scheduled<Void>?
    private var answered = false

    init(timeout: TimeAmount, logger: Logger) {
        self.timeout = timeout
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: timeout) {
            let (guardian, context) = loopBound.value
            guardian.answered = true
            guardian.logger.notice("connection closed: no request head within the idle timeout")
            guardian.end(context)
        }
    }

    /// Closes the connection as the upgrade handler closes one whose client half-closed it (its
    /// negotiation then ends quietly instead of with an error in the log).
    private func end(_ context: ChannelHandlerContext) {
        context.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        context.close(promise: nil)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
    }

    /// A graceful shutdown closes a connection that has not sent a whole request head yet
    /// (Hummingbird's handlers, which close idle connections on it, are not installed until then:
    /// five such connections held a shutdown to its 25 s limit).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent, !answered {
            answered = true
            end(context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError, !answered else {
            context.fireErrorCaught(error)
            return
        }
        answered = true
        let tooLarge = parserError == .headerOverflow
        let (status, slug, detail): (HTTPResponseStatus, String, String) =
            tooLarge
            ? (
                .requestHeaderFieldsTooLarge, "request-header-fields-too-large",
                "The request's head is larger than Herald reads (80 KiB of header fields in all, 80 KiB for one, 1 000 fields, or a URI over 80 KiB); send a smaller one."
            )
            : (.badRequest, "bad-request", "The request is not HTTP/1.1 that Herald can read (\(parserError)).")
        logger.notice("request refused before it was read", metadata: ["status": "\(status.code)", "error": "\(parserError)"])
        let body =
            "{\"type\":\(jsonQuoted("https://herald.dev/problems/\(slug)")),\"title\":\(jsonQuoted(status.reasonPhrase)),"
            + "\"status\":\(status.code),\"detail\":\(jsonQuoted(detail))}"
        var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
        buffer.writeString(body)
        let head = HTTPResponseHead(
            version: .http1_1, status: status,
            headers: [
                "Content-Type": "application/problem+json", "Content-Length": "\(buffer.readableBytes)", "Connection": "close",
            ])
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            let (guardian, context) = loopBound.value
            guardian.end(context)
        }
    }
}
