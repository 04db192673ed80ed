import Foundation
import Hummingbird
import HummingbirdTesting

@testable import HeraldAPI

/// The one set-up most tests need: a fresh organisation of their own (an owner and a member,
/// each with a live access token) and a client of an application on the shared database.
/// Tests stay independent because each works in its own organisation.
func withOrganisation(
    configure: @escaping (inout AppConfiguration) -> Void = { _ in },
    _ body: @Sendable (TestOrganisation, any TestClientProtocol) async throws -> Void
) async throws {
    let env = try await TestEnvironment.shared
    let org = try await TestOrganisation.make()
    try await env.application(configure: configure).test(.router) { client in try await body(org, client) }
}

/// `withOrganisation` with the medical-alert test catalogue (`TestCatalogue`) made in it.
func withCatalogue(
    configure: @escaping (inout AppConfiguration) -> Void = { _ in },
    _ body: @Sendable (TestOrganisation, TestCatalogue, any TestClientProtocol) async throws -> Void
) async throws {
    let env = try await TestEnvironment.shared
    let org = try await TestOrganisation.make()
    let catalogue = try await TestCatalogue.make(in: org)
    try await env.application(configure: configure).test(.router) { client in try await body(org, catalogue, client) }
}
