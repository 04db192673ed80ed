import Foundation
import HeraldCore
import HeraldStore

/// The channels that POST to an organisation's endpoints: one transport, two request shapes.
/// An HTTP 410 disables the endpoint (`SendOutcome.gone`).
struct EndpointChannel: ChannelTransport {
    let channel: NotificationChannel
    let http: HTTPTransport
    /// The request's headers and body for one delivery to `endpoint`.
    let request:
        @Sendable (_ work: DeliveryWork, _ endpoint: Endpoint, _ content: TemplateContent, _ open: String?, _ now: Date)
            -> (headers: [(String, String)], body: [UInt8])

    func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome {
        guard let endpoint = work.endpoint else { return .notSent(reason: "Not sent: the endpoint was deleted.") }
        let open = links.open(work, now: now)
        // Mattermost reads values' Markdown (links, images, mentions): escaped for it.
        let escaping = ValueEscaping.of(channel, format: endpoint.format)
        let (headers, body) = request(work, endpoint, content(work, links: open.map { ["open": $0] } ?? [:], escaping: escaping), open, now)
        return await http.post(endpoint.url, headers: headers + [("content-type", "application/json")], body: body)
    }

    /// Webhooks: a Standard Webhooks POST, signed with the endpoint's secrets (both during a
    /// rotation's overlap).
    static func webhook(http: HTTPTransport) -> EndpointChannel {
        EndpointChannel(channel: .webhook, http: http) { work, endpoint, content, open, now in
            let body = WebhookMessage.body(work, content: content, url: open)
            let headers = WebhookSigner.headers(
                id: "msg_\(work.delivery.id.lowercased)", timestamp: now, body: body,
                secrets: endpoint.signingSecrets(at: now).compactMap(WebhookSecret.init))
            return (headers, body)
        }
    }

    /// Chat: a Slack or Mattermost incoming-webhook message.
    static func chat(http: HTTPTransport) -> EndpointChannel {
        EndpointChannel(channel: .chat, http: http) { _, endpoint, content, open, _ in
            ([], ChatMessage.body(format: endpoint.format, content: content, url: open))
        }
    }
}
