import Foundation
import HeraldCore
import HeraldStore

/// Webhooks: a Standard Webhooks POST, signed with the endpoint's secrets (both during a
/// rotation's overlap). An HTTP 410 disables the endpoint (`SendOutcome.gone`).
public struct WebhookChannel: ChannelTransport {
    public let http: HTTPTransport
    public var channel: NotificationChannel { .webhook }

    public init(http: HTTPTransport) {
        self.http = http
    }

    public func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome {
        guard let endpoint = work.endpoint else { return .notSent(reason: "Not sent: the endpoint was deleted.") }
        let open = links.open(work, now: now)
        let body = WebhookMessage.body(work, content: content(work, links: open.map { ["open": $0] } ?? [:]), url: open)
        let headers = WebhookSigner.headers(id: "msg_\(work.delivery.id.lowercased)", timestamp: now, body: body,
                                            secrets: endpoint.signingSecrets(at: now).compactMap(WebhookSecret.init))
        return await http.post(endpoint.url, headers: headers + [("content-type", "application/json")], body: body)
    }
}

/// Chat: a Slack or Mattermost incoming-webhook message.
public struct ChatChannel: ChannelTransport {
    public let http: HTTPTransport
    public var channel: NotificationChannel { .chat }

    public init(http: HTTPTransport) {
        self.http = http
    }

    public func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome {
        guard let endpoint = work.endpoint else { return .notSent(reason: "Not sent: the endpoint was deleted.") }
        let open = links.open(work, now: now)
        let body = ChatMessage.body(format: endpoint.format, content: content(work, links: open.map { ["open": $0] } ?? [:]), url: open)
        return await http.post(endpoint.url, headers: [("content-type", "application/json")], body: body)
    }
}
