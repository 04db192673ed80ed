import Foundation
import HeraldCore
import Testing

@testable import HeraldDelivery
@testable import HeraldStore

/// The channel registry (issue 9, part 4): one transport per outbox channel, registered once.
@Suite("Channel transports")
struct ChannelTransportTests {
    /// A transport that sends nothing, for registration checks.
    struct Silent: ChannelTransport {
        var channel: NotificationChannel
        func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome { .notSent(reason: "silent") }
    }

    @Test("a receiver that refuses the connection fails the attempt in words")
    func refusedConnection() async throws {
        // Port 9 (discard) has no listener here: the kernel refuses the connection.
        let http = HTTPTransport(destinations: DestinationGuard(allowed: [IPNetwork("127.0.0.1/32")!]), connectionsPerHost: 1)
        // (Tried again until the connect timeout, then refused in words.)
        let outcome = await http.post("http://127.0.0.1:9/hook", headers: [], body: Array("{}".utf8))
        try await http.shutdown()
        guard case .refused(let code, let error, let permanent, _) = outcome else {
            Issue.record("not refused: \(outcome)")
            return
        }
        #expect(code == nil && !permanent)
        #expect(error == "The receiver refused the connection: nothing listens at its address and port.", "\(error)")
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

    /// What `WebhookMessage.body` wrote with `JSONEncoder` before it was written by hand.
    struct EncodedBody: Encodable {
        struct Recipient: Encodable { var id, email, display_name: String }
        struct Subject: Encodable { var type, id: String }
        struct Payload: Encodable {
            var event_id, delivery_id, notification_type, category, severity, priority: String
            var recipient: Recipient
            var subject: Subject?
            var title, body: String
            var url: String?
        }
        var type = "notification.created"
        var timestamp: Date
        var data: Payload
    }

    @Test(
        "a webhook's body is the bytes JSONEncoder wrote (sorted keys, unescaped slashes, whole seconds), with and without subject and url",
        arguments: [false, true])
    func webhookBody(optionals: Bool) throws {
        let type = TypeProfile(
            id: UUID(), key: "WARD_ALERT", name: "Ward", categoryID: UUID(), categoryKey: "alerts", categoryIsCritical: false,
            defaultChannels: [.webhook], defaultSeverity: .warning, defaultPriority: .high, templates: [:])
        let recipient = RecipientProfile(
            candidate: Candidate(userID: UUID(), active: true), email: "zoë+\"q\"@example.com", displayName: "Zoë \\ \"Z\"\n\u{01}/",
            locale: nil, timezone: nil, attributes: .object([:]))
        let input = PlanInput(
            eventID: UUID(), type: type, severity: .critical, priority: .high, payload: .object([:]),
            subjectType: optionals ? "bed/\"7\"" : nil, subjectID: optionals ? "b\t7" : nil,
            deliverAt: Date(timeIntervalSince1970: 1_795_000_123.987), organisationName: "Ward", organisationSlug: "ward",
            organisationLocale: "en", organisationTimezone: "UTC", throttlePerMinute: nil, recipients: [recipient], excluded: [],
            userPreferences: [:], organisationDefaults: [:], recentCounts: [:])
        let delivery = Delivery(
            id: UUID(), eventID: input.eventID, userID: recipient.candidate.userID, channel: .webhook, destination: "https://h.example/x",
            endpointID: UUID(), status: .sending, attempts: 1, maxAttempts: 8, nextAttemptAt: Date(), createdAt: Date(), updatedAt: Date())
        let work = DeliveryWork(
            organisationID: UUID(), delivery: delivery, input: input, recipient: recipient, eventStatus: .accepted, eventExpiresAt: nil,
            url: nil, email: EmailIdentity(), endpoint: nil)
        let content = TemplateContent(subject: "Bed \"7\" </b> ✓", body: "line 1\nline 2\r\t\u{7f} é")
        let url = optionals ? "https://app.example/beds/7?a=1&b=\"2\"" : nil

        let expected = EncodedBody(
            timestamp: input.deliverAt,
            data: .init(
                event_id: input.eventID.lowercased, delivery_id: delivery.id.lowercased, notification_type: type.key,
                category: type.categoryKey, severity: input.severity.rawValue, priority: input.priority.rawValue,
                recipient: .init(id: recipient.candidate.userID.lowercased, email: recipient.email, display_name: recipient.displayName),
                subject: input.subjectType.map { .init(type: $0, id: input.subjectID ?? "") }, title: content.subject,
                body: content.body, url: url))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        let written = WebhookMessage.body(work, content: content, url: url)
        #expect(String(decoding: written, as: UTF8.self) == String(decoding: try encoder.encode(expected), as: UTF8.self))
    }

    /// An error described as NIOSSL describes a failed handshake with a plain-HTTP receiver.
    struct Described: Error, CustomStringConvertible {
        var description: String
    }

    @Test("a failed request's words never carry the library's description (internals, this build's paths)")
    func failureWords() {
        let tls = Described(
            description:
                "handshakeFailed(NIOSSL.BoringSSLError.sslError([Error: 268435703 error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER at /tmp/x/.build/checkouts/swift-nio-ssl/Sources/CNIOBoringSSL/ssl/tls_record.cc:127]))"
        )
        let words = HTTPTransport.words(for: tls)
        #expect(words.hasPrefix("The TLS handshake with the receiver failed: it does not speak TLS on this port"))
        #expect(!words.contains("/") || words.contains("http://"))
        #expect(!words.contains(".build"))
        #expect(
            HTTPTransport.words(for: Described(description: "Module.SomeError.oddCase(\"/secret/path\")"))
                == "The request failed (oddCase).")
    }
}
