import Foundation
import HeraldCore
import HeraldStore
import Testing

@testable import HeraldDelivery

/// The channel registry (issue 9, part 4): one transport per outbox channel, registered once.
@Suite("Channel transports")
struct ChannelTransportTests {
    /// A transport that sends nothing, for registration checks.
    struct Silent: ChannelTransport {
        var channel: NotificationChannel
        func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome { .notSent(reason: "silent") }
    }

    @Test("a channel registered twice, or the feed registered as a transport, is refused")
    func registration() throws {
        #expect(throws: ChannelRegistrationError.registeredTwice(.email)) {
            try ChannelTransports([Silent(channel: .email), Silent(channel: .email)])
        }
        #expect(throws: ChannelRegistrationError.notAnOutboxChannel(.inApp)) {
            try ChannelTransports([Silent(channel: .inApp)])
        }
        let registry = try ChannelTransports([Silent(channel: .webhook), Silent(channel: .email)])
        #expect(registry.channels == [.email, .webhook])
        #expect(registry[.chat] == nil)
    }

    @Test("every outbox channel has a transport in the standard registration, and only those")
    func standardCoversTheOutbox() throws {
        let email = try #require(EmailTransport.settings(url: "smtp://127.0.0.1:1", username: nil, password: nil, timeout: 1))
        let http = HTTPTransport(destinations: DestinationGuard(allowed: []), connectionsPerHost: 1)
        defer { Task { try? await http.shutdown() } }
        let registry = ChannelTransports.standard(email: EmailTransport(settings: email, defaultFrom: "a@b.example"), http: http)
        #expect(registry.channels == NotificationChannel.allCases.filter(\.isOutbox))
    }

    @Test("where each channel reaches, as the planner sees it")
    func reach() {
        let profile = RecipientProfile(
            candidate: Candidate(userID: UUID(), active: true), email: "a@b.example", displayName: "A",
            locale: nil, timezone: nil, attributes: .object([:]))
        let endpoint = EndpointTarget(id: UUID(), url: "https://hooks.example/x")
        #expect(NotificationChannel.inApp.destinations(for: profile, endpoints: []).count == 1)
        #expect(NotificationChannel.email.destinations(for: profile, endpoints: []).map(\.address) == ["a@b.example"])
        #expect(NotificationChannel.webhook.destinations(for: profile, endpoints: []).isEmpty)
        #expect(
            NotificationChannel.chat.destinations(for: profile, endpoints: [endpoint]) == [
                ChannelDestination(address: endpoint.url, endpointID: endpoint.id)
            ])
    }
}
