import AsyncHTTPClient
import Foundation
import HeraldCore
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Posts webhook and chat messages: no redirects followed, bounded time, a capped read of the
/// reply, and the destination guard applied again just before connecting.
public final class HTTPTransport: Sendable {
    let client: HTTPClient
    let destinations: DestinationGuard
    let timeout: TimeAmount
    /// Most bytes of a reply read (and kept, up to 500 characters, as the attempt's response).
    let maxResponseBytes: Int
    /// Where the destination guard resolves names (getaddrinfo blocks): threads of the
    /// transport's own, as many as its connections per host up to 16. Dispatch's global queue
    /// ran two at a time on two cores.
    private let resolver: NIOThreadPool
    /// Destinations the guard passed, by URL, for `vettedLifetime`: each send to an endpoint
    /// resolved its name again on a thread of the resolver (a DNS query per webhook where the
    /// system does not cache, and two thread switches per send). A cached destination is still
    /// one the guard vetted, and plain http still connects to its address; a name that moves
    /// is followed within the lifetime. Refusals are not kept (a name may resolve later).
    private let vetted = Mutex<[String: (destination: VettedDestination, until: ContinuousClock.Instant)]>([:])
    static let vettedLifetime: Duration = .seconds(30)
    static let vettedLimit = 10_000

    /// `connectionsPerHost` should be at least the sends this process runs at once (its worker
    /// slots): then no send ever waits for a pooled connection, and endpoints that share a host
    /// (or an address) cannot starve each other (issue 8, item 13). The per-endpoint send limit
    /// is what bounds one endpoint.
    public init(
        destinations: DestinationGuard, timeout: TimeAmount = .seconds(10), maxResponseBytes: Int = 16 * 1024,
        connectionsPerHost: Int = 16
    ) {
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .seconds(5), read: timeout))
        configuration.httpVersion = .http1Only
        // Failed connections are retried until the connect timeout (AsyncHTTPClient's default):
        // without the retries, one failed connect fails every send waiting for that host's
        // pool, each counted as an attempt (and toward the endpoint's breaker).
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = max(8, connectionsPerHost)
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        self.destinations = destinations
        self.timeout = timeout
        self.maxResponseBytes = maxResponseBytes
        resolver = NIOThreadPool(numberOfThreads: min(16, max(2, connectionsPerHost)))
        resolver.start()
    }

    deinit {
        resolver.shutdownGracefully { _ in }
    }

    public func shutdown() async throws {
        try await client.shutdown()
    }

    public func post(_ url: String, headers: [(String, String)], body: [UInt8]) async -> SendOutcome {
        let vetted: VettedDestination
        let verdict: Result<VettedDestination, DestinationRefusal>
        do {
            verdict = try await vet(url)
        } catch {
            return .deferred(reason: "the HTTP transport is shutting down")
        }
        switch verdict {
        case .success(let destination): vetted = destination
        case .failure(let refusal):
            // A name that does not resolve now may resolve later; an address the guard refuses will not change.
            if case .unresolvable = refusal.reason { return .refused(code: nil, error: refusal.detail, permanent: false, retryAfter: nil) }
            return .refused(code: nil, error: refusal.detail, permanent: true, retryAfter: nil)
        }
        var request = HTTPClientRequest(url: pinned(url, vetted))
        request.method = .POST
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        if request.url != url { request.headers.replaceOrAdd(name: "host", value: vetted.hostHeader) }
        request.headers.replaceOrAdd(name: "user-agent", value: "Herald-Webhooks/1")
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let response = try await client.execute(request, timeout: timeout + .seconds(5))
            let code = Int(response.status.code)
            let reply = try await read(response.body)
            switch code {
            case 200..<300:
                return .accepted(code: code, response: reply)
            case 410:
                return .gone(code: code, error: "The receiver answered 410 Gone; the endpoint is now disabled.")
            default:
                return .refused(
                    code: code, error: "The receiver answered \(code)\(reply.isEmpty ? "" : ": \(reply)")", permanent: false,
                    retryAfter: response.headers.first(name: "retry-after").flatMap { RetryAfter.seconds($0, now: Date()) })
            }
        } catch let error as HTTPClientError where error == .getConnectionFromPoolTimeout {
            // Waiting for a connection says nothing about the receiver: not an attempt.
            return .deferred(reason: "no connection to the receiver's host was free")
        } catch {
            return .refused(code: nil, error: Self.words(for: error), permanent: false, retryAfter: nil)
        }
    }

    /// The guard's verdict on `url`: a destination it passed in the last `vettedLifetime`, or
    /// its verdict now, from the resolver's threads (name resolution blocks).
    private func vet(_ url: String) async throws -> Result<VettedDestination, DestinationRefusal> {
        let now = ContinuousClock.now
        if let kept = vetted.withLock({ $0[url] }), kept.until > now { return .success(kept.destination) }
        let verdict = try await resolver.runIfActive { [destinations] in
            Result { () throws(DestinationRefusal) in try destinations.vet(url: url) }
        }
        if case .success(let destination) = verdict {
            vetted.withLock { kept in
                if kept.count >= Self.vettedLimit { kept.removeAll(keepingCapacity: true) }
                kept[url] = (destination, now + Self.vettedLifetime)
            }
        }
        return verdict
    }

    /// A failed request in words a tenant admin can act on (a delivery's `last_error`).
    static func words(for error: any Error) -> String {
        if let client = error as? HTTPClientError {
            if client == .connectTimeout { return "The connection to the receiver timed out." }
            if client == .tlsHandshakeTimeout { return "The TLS handshake with the receiver timed out." }
            if client == .readTimeout || client == .deadlineExceeded { return "The receiver did not answer in time." }
            if client == .remoteConnectionClosed { return "The receiver closed the connection before answering." }
        }
        switch errnoCode(of: error) {
        case ECONNREFUSED: return "The receiver refused the connection: nothing listens at its address and port."
        case ECONNRESET: return "The receiver reset the connection."
        case EHOSTUNREACH, ENETUNREACH: return "The receiver's address cannot be reached."
        default: return tlsWords(for: "\(error)") ?? "The request failed (\(Self.firstWord(of: "\(error)")))."
        }
    }

    /// A TLS failure in words; its description names the TLS library's internals, down to a
    /// source path of this build, which a tenant must not see (a trial read one in `last_error`).
    static func tlsWords(for text: String) -> String? {
        guard text.contains("SSL") || text.contains("handshake") || text.contains("ertificate") else { return nil }
        if text.contains("WRONG_VERSION_NUMBER") {
            return "The TLS handshake with the receiver failed: it does not speak TLS on this port (an http:// server at an https:// URL?)."
        }
        if text.contains("ertificate") || text.contains("CERTIFICATE") {
            return "The receiver's TLS certificate is not trusted for its name."
        }
        return "The TLS handshake with the receiver failed."
    }

    /// The error's case, without what it carries (`handshakeFailed(…)` → `handshakeFailed`).
    static func firstWord(of text: String) -> String {
        let head = text.prefix { $0 != "(" && $0 != ":" && $0 != " " }.split(separator: ".").last.map(String.init) ?? ""
        return head.isEmpty ? "unknown error" : String(head.prefix(60))
    }

    /// The system error under a connection failure, if there is one.
    private static func errnoCode(of error: any Error) -> Int32? {
        if let io = error as? IOError { return io.errnoCode }
        if let connection = error as? NIOConnectionError {
            return connection.connectionErrors.lazy.compactMap { errnoCode(of: $0.error) }.first
        }
        return nil
    }

    /// For plain http the connection goes to the address the guard vetted, so a name that
    /// resolves differently a moment later (DNS rebinding) cannot redirect it. https keeps the
    /// name, for the certificate check; the guard ran just before, which narrows that window.
    private func pinned(_ url: String, _ vetted: VettedDestination) -> String {
        guard vetted.scheme == "http", let address = vetted.addresses.first, var components = URLComponents(string: url) else { return url }
        components.host = address.urlHost
        return components.string ?? url
    }

    /// The start of the reply, read up to the cap and kept as text.
    private func read(_ body: HTTPClientResponse.Body) async throws -> String {
        var buffer = ByteBuffer()
        for try await chunk in body {
            buffer.writeImmutableBuffer(
                chunk.getSlice(at: chunk.readerIndex, length: min(chunk.readableBytes, maxResponseBytes - buffer.readableBytes))
                    ?? ByteBuffer())
            if buffer.readableBytes >= maxResponseBytes { break }
        }
        return String(String(decoding: buffer.readableBytesView, as: UTF8.self).prefix(500))
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): a number of seconds or an HTTP date.
public enum RetryAfter {
    public static func seconds(_ value: String, now: Date) -> TimeInterval? {
        let trimmed = value.trimmingCharacters(in: .whitespaces)
        if let seconds = Int(trimmed) { return seconds >= 0 ? TimeInterval(seconds) : nil }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: trimmed) else { return nil }
        return max(0, date.timeIntervalSince(now))
    }
}
