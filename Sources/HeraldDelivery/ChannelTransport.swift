import Foundation
import HeraldCore
import HeraldStore

/// One channel's way out: how a delivery of the channel is rendered and sent, and what the
/// receiver's answer means (as a `SendOutcome`: accepted, refused and whether for good, gone).
/// Where a channel's messages go is the engine's business (`NotificationChannel.reach`).
///
/// A new channel (SMS, web push) is one file with a type conforming to this, its registration
/// in `ChannelTransports.standard`, its case in
/// `NotificationChannel` and the spec's enum, and a migration adding it to the SQL domain.
public protocol ChannelTransport: Sendable {
    /// The channel this transport sends for.
    var channel: NotificationChannel { get }
    /// Sends one delivery that still qualifies (the sender checked the event, the recipient and,
    /// for endpoint channels, the endpoint).
    func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome
}

extension ChannelTransport {
    /// The recipient's content for this channel, from its own template, or the in-app one when
    /// the type has none for it. Templates see `links.open` and `links.unsubscribe`. `escaping`:
    /// how values in the subject and text are escaped (`ValueEscaping`).
    func content(_ work: DeliveryWork, links: [String: String] = [:], escaping: ValueEscaping = .html) -> TemplateContent {
        NotificationPlanner.outboxContent(work.input, work.recipient, channel: channel, links: links, escaping: escaping)
    }
}

/// The registry: at most one transport per outbox channel.
public struct ChannelTransports: Sendable {
    private let byChannel: [NotificationChannel: any ChannelTransport]

    public init(_ transports: [any ChannelTransport]) throws(ChannelRegistrationError) {
        var byChannel: [NotificationChannel: any ChannelTransport] = [:]
        for transport in transports {
            guard transport.channel.isOutbox else { throw .notAnOutboxChannel(transport.channel) }
            guard byChannel[transport.channel] == nil else { throw .registeredTwice(transport.channel) }
            byChannel[transport.channel] = transport
        }
        self.byChannel = byChannel
    }

    /// The registration: email over SMTP, webhooks (Standard Webhooks) and chat (Slack,
    /// Mattermost) over HTTP.
    public static func standard(email: EmailTransport, http: HTTPTransport) -> ChannelTransports {
        ChannelTransports(uncheckedDistinct: [
            EmailChannel(transport: email), EndpointChannel.webhook(http: http), EndpointChannel.chat(http: http),
        ])
    }

    private init(uncheckedDistinct transports: [any ChannelTransport]) {
        byChannel = Dictionary(uniqueKeysWithValues: transports.map { ($0.channel, $0) })
    }

    public subscript(channel: NotificationChannel) -> (any ChannelTransport)? { byChannel[channel] }

    /// The channels with a transport.
    public var channels: [NotificationChannel] { byChannel.keys.sorted() }
}

/// A registration that cannot work: a bug in how the sender is built.
public enum ChannelRegistrationError: Error, Sendable, Equatable {
    case notAnOutboxChannel(NotificationChannel)
    case registeredTwice(NotificationChannel)
}
