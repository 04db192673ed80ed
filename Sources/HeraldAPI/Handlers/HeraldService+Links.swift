import Foundation
import HeraldCore
import HeraldStore
import OpenAPIRuntime

/// Signed links in messages. No login: the token (HMAC with a key id, scope and expiry) is the
/// credential, and it names the organisation, so `TenantBoundary` runs each request in that
/// organisation's context as the user the message went to. Any bad token is the same 404.
extension HeraldService {
    func followLink(_ input: Operations.FollowLink.Input) async throws -> Operations.FollowLink.Output {
        let claims = try verifiedLink()
        guard let link = claims.deliveryID.map(TrackedLink.delivery) ?? claims.digestItemID.map(TrackedLink.digestItem) else {
            throw APIError.notFound(resource: "link")
        }
        let now = now()
        // A tracked click is engagement (the inactivity rule); a HEAD (a link scanner) is not a click.
        let counted = RequestScope.current?.head != true
        let click = try await transaction { tx in try await tx.recordClick(on: link, userID: claims.userID, at: now, counted: counted) }
        guard let url = click.url else { throw APIError.notFound(resource: "link") }
        return .found(.init(headers: .init(location: url)))
    }

    /// Changes nothing: mail scanners and link previews follow GET links.
    func showUnsubscribe(_ input: Operations.ShowUnsubscribe.Input) async throws -> Operations.ShowUnsubscribe.Output {
        let claims = try verifiedLink()
        let (categories, channel) = try await unsubscribeTargets(claims)
        let names = try await transaction { tx in
            var names: [String] = []
            for category in categories { names.append(try await tx.category(category).name) }
            return names
        }
        let page = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title></head><body>
            <p>Stop receiving <strong>\(htmlEscaped(names.sorted().joined(separator: ", ")))</strong> notifications by \(channel.rawValue)?</p>
            <form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click"><button type="submit">Unsubscribe</button></form>
            </body></html>
            """
        return .ok(.init(body: .html(HTTPBody(page))))
    }

    /// Whether a `multipart/form-data` body (what RFC 8058 asks mail receivers to send) has the
    /// part `List-Unsubscribe` saying `One-Click`; other parts are read past.
    static func saysOneClick(_ parts: MultipartBody<Operations.Unsubscribe.Input.Body.MultipartFormPayload>) async throws -> Bool {
        var found = false
        do {
            for try await part in parts {
                switch part {
                case .listUnsubscribe(let field):
                    found = try await String(collecting: field.payload.body, upTo: 64) == "One-Click"
                case .undocumented(let other):
                    _ = try await [UInt8](collecting: other.body, upTo: 64 * 1024)
                }
            }
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            // A body that is not the multipart it says it is, or that lacks the part: the client's.
            throw APIError.badRequest("The body must be List-Unsubscribe=One-Click (RFC 8058).")
        }
        return found
    }

    /// RFC 8058 one-click: the body must say `List-Unsubscribe=One-Click`; no cookies, no login,
    /// 200 without a redirect.
    func unsubscribe(_ input: Operations.Unsubscribe.Input) async throws -> Operations.Unsubscribe.Output {
        let claims = try verifiedLink()
        let oneClick: Bool
        switch input.body {
        case .urlEncodedForm(let form): oneClick = form.listUnsubscribe == .oneClick
        case .multipartForm(let parts): oneClick = try await Self.saysOneClick(parts)
        }
        guard oneClick else { throw APIError.badRequest("The body must be List-Unsubscribe=One-Click (RFC 8058).") }
        let (categories, channel) = try await unsubscribeTargets(claims)
        let names = try await transaction { tx in
            var names: [String] = []
            for category in categories {
                let before = try await tx.unsubscribe(userID: claims.userID, categoryID: category, channel: channel)
                let shown = try await tx.category(category)
                names.append(shown.name)
                // Switched off already (a second click, a mail scanner's POST): nothing changed.
                if before?.enabled == false { continue }
                // As the preference API shows a cell (category key, channel, enabled, frequency);
                // no `before` when the user had no setting of their own (the default applied).
                try await tx.audit(
                    action: "preference.unsubscribe", targetType: "user", targetID: claims.userID.lowercased,
                    before: try before.map { try auditValue(UnsubscribeAudit(shown.key, channel, $0, via: nil)) },
                    after: try auditValue(
                        UnsubscribeAudit(
                            shown.key, channel, PreferenceSetting(enabled: false, frequency: before?.frequency ?? .none),
                            via: claims.digestRunID.map { "one-click unsubscribe, digest run \($0.lowercased)" }
                                ?? "one-click unsubscribe, delivery \(claims.deliveryID?.lowercased ?? "-")")))
            }
            return names
        }
        let page = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><title>Unsubscribed</title></head><body>
            <p>You will no longer receive <strong>\(htmlEscaped(names.sorted().joined(separator: ", ")))</strong> notifications by \(channel.rawValue).</p></body></html>
            """
        return .ok(.init(body: .html(HTTPBody(page))))
    }

    /// Changes nothing: mail scanners and link previews follow GET links.
    func showKeepSubscribed(_ input: Operations.ShowKeepSubscribed.Input) async throws -> Operations.ShowKeepSubscribed.Output {
        _ = try verifiedLink()
        let name = try await transaction { tx in try await tx.organisation().name }
        let page = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><title>Keep me subscribed</title></head><body>
            <p>Keep receiving <strong>\(htmlEscaped(name))</strong> notifications by email?</p>
            <form method="post"><button type="submit">Keep me subscribed</button></form>
            </body></html>
            """
        return .ok(.init(body: .html(HTTPBody(page))))
    }

    /// Engagement: the inactivity rule starts counting again and withdraws its warning.
    func keepSubscribed(_ input: Operations.KeepSubscribed.Input) async throws -> Operations.KeepSubscribed.Output {
        let claims = try verifiedLink()
        let now = now()
        let name = try await transaction { tx in
            try await tx.recordEngagement(of: claims.userID, at: now)
            try await tx.audit(
                action: "user.keep_subscribed", targetType: "user", targetID: claims.userID.lowercased, before: nil, after: nil)
            return try await tx.organisation().name
        }
        let page = """
            <!doctype html><html lang="en"><head><meta charset="utf-8"><title>Subscribed</title></head><body>
            <p>Thank you: you stay subscribed to <strong>\(htmlEscaped(name))</strong> notifications by email.</p></body></html>
            """
        return .ok(.init(body: .html(HTTPBody(page))))
    }

    /// The link's claims, verified by `TenantBoundary` (which also opened the transaction in
    /// the link's organisation, acting as the user the message went to).
    private func verifiedLink() throws -> LinkClaims {
        guard let claims = try RequestScope.get().link else { throw APIError.notFound(resource: "link") }
        return claims
    }

    /// The categories and the channel a link unsubscribes from: the message's category, or every
    /// category of a digest.
    private func unsubscribeTargets(_ claims: LinkClaims) async throws -> ([UUID], NotificationChannel) {
        guard let channel = claims.channel.flatMap(NotificationChannel.init(rawValue:)) else { throw APIError.notFound(resource: "link") }
        if let category = claims.categoryID { return ([category], channel) }
        guard let run = claims.digestRunID else { throw APIError.notFound(resource: "link") }
        let categories = try await transaction { tx in try await tx.digestRunCategories(run, userID: claims.userID) }
        guard !categories.isEmpty else { throw APIError.notFound(resource: "link") }
        return (categories, channel)
    }
}

/// A preference cell as the audit log keeps an unsubscribe: the API's fields, and how it came.
private struct UnsubscribeAudit: Encodable {
    var category: String
    var channel: String
    var enabled: Bool
    var frequency: String
    var via: String?

    init(_ category: String, _ channel: NotificationChannel, _ setting: PreferenceSetting, via: String?) {
        self.category = category
        self.channel = channel.rawValue
        enabled = setting.enabled
        frequency = setting.frequency.rawValue
        self.via = via
    }
}
