import Foundation
import HeraldCore
import HeraldStore

extension HeraldService {
    func listEndpoints(_ input: Operations.ListEndpoints.Input) async throws -> Operations.ListEndpoints.Output {
        let (limit, cursor) = try page(input.query.limit, input.query.cursor)
        let page = try await tenant { tx, _ in try await tx.endpoints(limit: limit, after: cursor) }
        return .ok(.init(body: .json(.init(items: try page.items.map { try .init($0) }, nextCursor: page.next?.encoded))))
    }

    func getEndpoint(_ input: Operations.GetEndpoint.Input) async throws -> Operations.GetEndpoint.Output {
        let id = try id(input.path.endpointId, "endpoint")
        let endpoint = try await tenant { tx, _ in try await tx.endpoint(id) }
        return .ok(.init(body: .json(try .init(endpoint))))
    }

    /// A webhook endpoint's secret is in this answer only.
    func createEndpoint(_ input: Operations.CreateEndpoint.Input) async throws -> Operations.CreateEndpoint.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let channel = mapped(body.channel, to: NotificationChannel.self)
        let format = body.format.map { mapped($0, to: EndpointFormat.self) } ?? (channel == .webhook ? .standard : .slack)
        guard (channel == .webhook) == (format == .standard) else {
            throw APIError.unprocessable(
                ValidationError(
                    field: "format",
                    message: channel == .webhook ? "must be standard for a webhook." : "must be slack or mattermost for chat."))
        }
        let (name, eventTypes) = (
            try Validate.text(body.name, field: "name"),
            try (body.eventTypes ?? []).map { v throws(ValidationError) in try Validate.typeKey(v, field: "event_types") }
                .keepingFirstOfEach()
        )
        let url = try await vetted(body.url)
        let secret = channel == .webhook ? WebhookSecret.generate().string : nil
        let created = try await tenant { tx, _ in
            try await requireKnownTypes(eventTypes, in: tx)
            let endpoint = try await tx.createEndpoint(
                channel: channel, format: format, name: name, url: url, eventTypes: eventTypes, secret: secret)
            try await tx.audit(
                action: "endpoint.create", targetType: "endpoint", targetID: endpoint.id.lowercased, before: nil,
                after: try auditValue(Components.Schemas.Endpoint(endpoint)))
            return endpoint
        }
        return .created(.init(body: .json(try .init(created, showingSecret: true))))
    }

    func updateEndpoint(_ input: Operations.UpdateEndpoint.Input) async throws -> Operations.UpdateEndpoint.Output {
        let id = try id(input.path.endpointId, "endpoint")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        var url: String?
        if let given = body.url { url = try await vetted(given) }
        let fields = EndpointFields(
            name: try body.name.map { name in try Validate.text(name, field: "name") },
            url: url,
            eventTypes: try body.eventTypes.map { types in
                try types.map { v throws(ValidationError) in try Validate.typeKey(v, field: "event_types") }.keepingFirstOfEach()
            },
            enabled: body.enabled)
        let endpoint = try await tenant { tx, _ in
            let before = try await tx.endpoint(id)
            try await requireKnownTypes(fields.eventTypes ?? [], in: tx)
            let after = try await tx.updateEndpoint(id, fields)
            try await tx.audit(
                action: "endpoint.update", targetType: "endpoint", targetID: id.lowercased,
                before: try auditValue(Components.Schemas.Endpoint(before)), after: try auditValue(Components.Schemas.Endpoint(after)))
            return after
        }
        return .ok(.init(body: .json(try .init(endpoint))))
    }

    /// An endpoint's event types name types of the catalogue: a misspelt one would leave the
    /// endpoint silent for ever. (A type deleted later stays in the list, matching nothing.)
    private func requireKnownTypes(_ keys: [String], in tx: TenantTransaction) async throws {
        guard let unknown = try await tx.unknownTypeKeys(keys).first else { return }
        throw APIError.unknownType(unknown, field: "event_types")
    }

    func deleteEndpoint(_ input: Operations.DeleteEndpoint.Input) async throws -> Operations.DeleteEndpoint.Output {
        let id = try id(input.path.endpointId, "endpoint")
        try await tenant { tx, _ in
            let before = try await tx.endpoint(id)
            try await tx.deleteEndpoint(id)
            try await tx.audit(
                action: "endpoint.delete", targetType: "endpoint", targetID: id.lowercased,
                before: try auditValue(Components.Schemas.Endpoint(before)), after: nil)
        }
        return .noContent(.init())
    }

    func rotateEndpointSecret(_ input: Operations.RotateEndpointSecret.Input) async throws -> Operations.RotateEndpointSecret.Output {
        let id = try id(input.path.endpointId, "endpoint")
        var overlap = 86_400
        if case .json(let body)? = input.body, let seconds = body.overlapSeconds { overlap = seconds }
        guard (0...604_800).contains(overlap) else {
            throw APIError.unprocessable(ValidationError(field: "overlap_seconds", message: "must be 0 to 604800 (7 days)."))
        }
        let until = now().addingTimeInterval(TimeInterval(overlap))
        let endpoint = try await tenant { tx, _ in
            let before = try await tx.endpoint(id)
            // The endpoint's state, not the request, is in the way: 409, as for a cancelled event.
            guard before.channel == .webhook else {
                throw APIError.conflict("This is a chat endpoint; only webhook endpoints have a secret.")
            }
            let after = try await tx.rotateEndpointSecret(id, newSecret: WebhookSecret.generate().string, overlapUntil: until, now: now())
            try await tx.audit(
                action: "endpoint.rotate_secret", targetType: "endpoint", targetID: id.lowercased,
                before: try auditValue(Components.Schemas.Endpoint(before)), after: try auditValue(Components.Schemas.Endpoint(after)))
            return after
        }
        return .ok(.init(body: .json(try .init(endpoint, showingSecret: true))))
    }

    /// The URL as given, once the destination guard accepts it (syntax, scheme, and every
    /// address its host resolves to). The worker checks again before each connection.
    private func vetted(_ url: String) async throws -> String {
        _ = try Validate.httpURL(url, field: "url")
        if case .failure(let refusal) = await destinations.vetInBackground(url: url) {
            throw APIError.unprocessable(ValidationError(field: "url", message: refusal.detail))
        }
        return url
    }
}

extension Components.Schemas.Endpoint {
    /// The endpoint as the API shows it; the secret only when just created or rotated.
    init(_ e: Endpoint, showingSecret: Bool = false) throws {
        self.init(
            id: e.id.lowercased, channel: try mapped(e.channel), format: mapped(e.format),
            name: e.name, url: e.url, eventTypes: e.eventTypes, enabled: e.enabled, disabledReason: e.disabledReason,
            secret: showingSecret ? e.secret : nil, previousSecretExpiresAt: e.overlapEnds(at: Date()),
            circuit: .init(e.circuit, now: Date()), createdAt: e.createdAt, updatedAt: e.updatedAt)
    }
}

extension Components.Schemas.EndpointCircuit {
    /// The breaker as the API shows it at `now` (issue 8, item 13).
    init(_ c: EndpointCircuit, now: Date) {
        let state: StatePayload =
            switch c.state(at: now) {
            case .closed: .closed
            case .open: .open
            case .halfOpen: .halfOpen
            }
        let closed = c.openedAt == nil
        self.init(
            state: state, failures: c.failures, openedAt: c.openedAt, retryAt: closed ? nil : c.retryAt, reason: closed ? nil : c.reason)
    }
}
