import Foundation
import HeraldCore
import HeraldStore
import Logging

/// What one attempt to hand a delivery over came to.
public enum SendOutcome: Sendable, Equatable {
    /// The receiver took it (SMTP 250, HTTP 2xx), with its reply.
    case accepted(code: Int?, response: String?)
    /// The receiver refused or could not be reached. `permanent` ends the delivery (SMTP 5xx,
    /// a destination the guard refuses); otherwise it is retried, not before `retryAfter`.
    case refused(code: Int?, error: String, permanent: Bool, retryAfter: TimeInterval?)
    /// HTTP 410: the receiver is gone for good; the delivery ends and the endpoint is disabled.
    case gone(code: Int, error: String)
    /// Nothing was sent, for a reason of this process and not of the receiver (no connection
    /// was free): the delivery is given back without counting an attempt.
    case deferred(reason: String)
    /// Nothing was sent: the mail server's circuit is open (`RelayCircuit`). Given back without
    /// counting an attempt, due when it may be tried again.
    case paused(until: Date, reason: String)
    /// Nothing was sent and nothing will be: the event expired, the recipient was deactivated,
    /// the endpoint deleted or disabled. The delivery ends `DEAD` with the reason.
    case notSent(reason: String)
    /// Nothing was sent and nothing will be: the event was cancelled after the delivery was
    /// claimed. It ends `CANCELLED`, as the cancel ends the rows nobody held.
    case cancelled(reason: String)

    /// The attempt's record: retried on the policy's schedule while attempts remain.
    public func result(
        attempt: Int, maxAttempts: Int, policy: RetryPolicy, now: Date,
        random: Double = Double.random(in: 0..<1)
    ) -> AttemptResult {
        switch self {
        case .accepted(let code, let response):
            return .sent(responseCode: code, response: response)
        case .gone(let code, let error):
            return .dead(responseCode: code, error: error)
        case .refused(let code, let error, let permanent, let retryAfter):
            var policy = policy
            policy.maximumAttempts = maxAttempts
            guard !permanent, let next = policy.nextAttempt(after: attempt, failedAt: now, retryAfter: retryAfter, random: random) else {
                return .dead(responseCode: code, error: error)
            }
            return .failed(responseCode: code, error: error, retryAt: next)
        case .notSent(let reason):
            return .dead(responseCode: nil, error: reason)
        case .cancelled(let reason):
            return .cancelled(error: reason)
        case .deferred(let reason), .paused(_, let reason):
            // Only reached when a caller records a deferral as an attempt; the pool releases instead.
            guard let next = policy.nextAttempt(after: attempt, failedAt: now, retryAfter: nil, random: random) else {
                return .dead(responseCode: nil, error: "Not sent: \(reason).")
            }
            return .failed(responseCode: nil, error: "Not sent: \(reason).", retryAt: next)
        }
    }

    /// The receiver gave no answer at all (timed out, refused or reset the connection): what
    /// the circuit breaker counts. Nil when the outcome says nothing about the receiver.
    var receiverAnswered: Bool? {
        switch self {
        case .accepted, .gone: true
        case .refused(let code, _, let permanent, _): permanent ? nil : code != nil
        case .deferred, .paused, .notSent, .cancelled: nil
        }
    }
}

/// Checks that a delivery still qualifies, then hands it to its channel's transport.
public struct DeliverySender: Sendable {
    let transports: ChannelTransports
    let links: LinkBuilder

    /// A sender over these transports, one per outbox channel (`ChannelTransports` refuses two
    /// for one channel).
    public init(transports: [any ChannelTransport], links: LinkBuilder) throws {
        self.transports = try ChannelTransports(transports)
        self.links = links
    }

    /// The standard registration: email over SMTP, webhooks and chat over HTTP.
    public init(email: EmailTransport, http: HTTPTransport, links: LinkBuilder) {
        self.transports = ChannelTransports.standard(email: email, http: http)
        self.links = links
    }

    public func send(_ work: DeliveryWork, attempt: Int, logger: Logger, now: Date = Date()) async -> SendOutcome {
        if let stop = stop(work, now: now) { return stop }
        return await deliver(work, now: now)
    }

    /// Hands `work` to its channel's transport, for a caller that has just asked `stop`.
    func deliver(_ work: DeliveryWork, now: Date = Date()) async -> SendOutcome {
        let channel = work.delivery.channel
        guard let transport = transports[channel] else {
            return .notSent(reason: "Not sent: \(channel.rawValue) is not an outbox channel.")
        }
        return await transport.send(work, links: links, now: now)
    }

    /// Why `work` will not be sent, checked before anything else (and before an endpoint's
    /// circuit trial is taken for it: a trial that sends nothing proves nothing): nil to send.
    public func stop(_ work: DeliveryWork, now: Date) -> SendOutcome? {
        if work.eventStatus == .cancelled { return .cancelled(reason: "Not sent: the event was cancelled.") }
        if let expiry = work.eventExpiresAt, expiry <= now { return .notSent(reason: "Not sent: the event expired first.") }
        if !work.recipient.candidate.active { return .notSent(reason: "Not sent: the recipient was deactivated.") }
        if work.emailSwitchedOff {
            return .cancelled(
                reason:
                    "Not sent: the recipient switched email off for \(work.categoryName) after the event (an unsubscribe or a preference).")
        }
        if work.delivery.channel.reach == .endpoints {
            guard let endpoint = work.endpoint else { return .notSent(reason: "Not sent: the endpoint was deleted.") }
            guard endpoint.enabled else {
                return .notSent(reason: "Not sent: the endpoint is disabled\(endpoint.disabledReason.map { " (\($0))" } ?? "").")
            }
        }
        return nil
    }
}

/// The JSON body of a webhook: Standard Webhooks' `type`, `timestamp`, `data`. It carries the
/// rendered content and ids, never the raw event payload (a template decides what leaves).
/// Written by hand in the bytes `JSONEncoder` wrote (sorted keys, unescaped slashes, dates in
/// whole seconds; `DeliveryTests` compares the two): the encoder was 4 % of the worker's CPU
/// per webhook (issue 12).
enum WebhookMessage {
    static func body(_ work: DeliveryWork, content: TemplateContent, url: String?) -> [UInt8] {
        let input = work.input
        var out = "{\"data\":{\"body\":"
        out.reserveCapacity(512 + content.subject.utf8.count + content.body.utf8.count)
        out += jsonQuoted(content.body)
        out += ",\"category\":"
        out += jsonQuoted(input.type.categoryKey)
        out += ",\"delivery_id\":\""
        out += work.delivery.id.lowercased
        out += "\",\"event_id\":\""
        out += input.eventID.lowercased
        out += "\",\"notification_type\":"
        out += jsonQuoted(input.type.key)
        out += ",\"priority\":"
        out += jsonQuoted(input.priority.rawValue)
        out += ",\"recipient\":{\"display_name\":"
        out += jsonQuoted(work.recipient.displayName)
        out += ",\"email\":"
        out += jsonQuoted(work.recipient.email)
        out += ",\"id\":\""
        out += work.recipient.candidate.userID.lowercased
        out += "\"},\"severity\":"
        out += jsonQuoted(input.severity.rawValue)
        out += jsonSubjectMember(type: input.subjectType, id: input.subjectID)
        out += ",\"title\":"
        out += jsonQuoted(content.subject)
        if let url {
            out += ",\"url\":"
            out += jsonQuoted(url)
        }
        out += "},\"timestamp\":\""
        out += RFC3339.wholeSeconds(input.deliverAt)
        out += "\",\"type\":\"notification.created\"}"
        return Array(out.utf8)
    }
}

/// A Slack or Mattermost incoming-webhook message: both take `text` with their Markdown.
enum ChatMessage {
    static func body(format: EndpointFormat, content: TemplateContent, url: String?) -> [UInt8] {
        // The text arrives HTML-escaped (templates escape values); Slack decodes only &amp;, &lt;
        // and &gt; (its own escapes), so the other two would show as written.
        let text = { (value: String) in
            format == .slack ? value.replacingOccurrences(of: "&#39;", with: "'").replacingOccurrences(of: "&quot;", with: "\"") : value
        }
        var lines = [format == .slack ? "*\(text(content.subject))*" : "**\(content.subject)**"]
        if !content.body.isEmpty { lines.append(text(content.body)) }
        if let url { lines.append(format == .slack ? "<\(url)|Open>" : "[Open](\(url))") }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array((try? encoder.encode(["text": lines.joined(separator: "\n")])) ?? Foundation.Data())
    }
}

/// Signed links for a delivery: the tracked link (only when the event names a URL) and the
/// one-click unsubscribe link.
public struct LinkBuilder: Sendable {
    public var baseURL: String
    public var keys: LinkKeyRing
    public var clickLifetime: TimeInterval = 90 * 24 * 3600
    public var unsubscribeLifetime: TimeInterval = 365 * 24 * 3600

    public init(baseURL: String, keys: LinkKeyRing) {
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        self.keys = keys
    }

    func open(_ work: DeliveryWork, now: Date) -> String? {
        guard work.url != nil else { return nil }
        let claims = LinkClaims(
            scope: .click, organisationID: work.organisationID, userID: work.recipient.candidate.userID,
            deliveryID: work.delivery.id, expiresAt: now.addingTimeInterval(clickLifetime))
        return "\(baseURL)/v1/links/\(keys.sign(claims))"
    }

    func unsubscribe(_ work: DeliveryWork, now: Date) -> String {
        let claims = LinkClaims(
            scope: .unsubscribe, organisationID: work.organisationID, userID: work.recipient.candidate.userID,
            deliveryID: work.delivery.id, categoryID: work.input.type.categoryID, channel: work.delivery.channel.rawValue,
            expiresAt: now.addingTimeInterval(unsubscribeLifetime))
        return "\(baseURL)/v1/unsubscribe/\(keys.sign(claims))"
    }
}
