import Foundation

/// Where a channel's messages go, which is all the engine needs to know about a channel: the
/// planner asks it whether a recipient can be reached and what a delivery's destination is;
/// how a message is rendered and sent is the channel's transport (`HeraldDelivery`).
public enum ChannelReach: Sendable, Equatable {
    /// A row in the recipient's in-app feed; nothing goes through the outbox.
    case feed
    /// The recipient's own address (email).
    case recipientAddress
    /// Each of the organisation's enabled endpoints of the channel that take the event's type
    /// (webhooks, chat).
    case endpoints
}

/// One destination of a planned delivery.
public struct ChannelDestination: Sendable, Equatable {
    public var address: String
    public var endpointID: UUID?

    public init(address: String, endpointID: UUID? = nil) {
        self.address = address
        self.endpointID = endpointID
    }
}

extension NotificationChannel {
    /// The channel's reach, defined once. A new channel adds its case here (the compiler asks
    /// for it), a transport in `HeraldDelivery`, the spec's enum and the SQL domain's value.
    public var reach: ChannelReach {
        switch self {
        case .inApp: .feed
        case .email: .recipientAddress
        case .webhook, .chat: .endpoints
        }
    }

    /// Whether a user's own setting applies to this channel: not for the organisation's endpoints
    /// (webhook, chat), which the organisation's defaults and the type's channels decide (a trial's
    /// member switched the team's Slack on for their own alerts, and the backend's webhook off).
    public var isPersonal: Bool { reach != .endpoints }

    /// Whether this channel's messages are deliveries in the outbox.
    public var isOutbox: Bool { reach != .feed }

    /// Where a message on this channel goes for `profile`: empty when the recipient cannot be
    /// reached on it (no endpoint takes the type). The feed's "destination" is the recipient.
    public func destinations(for profile: RecipientProfile, endpoints: [EndpointTarget]) -> [ChannelDestination] {
        switch reach {
        case .feed: [ChannelDestination(address: profile.candidate.userID.lowercased)]
        case .recipientAddress: profile.email.isEmpty ? [] : [ChannelDestination(address: profile.email)]
        case .endpoints: endpoints.map { ChannelDestination(address: $0.url, endpointID: $0.id) }
        }
    }
}
