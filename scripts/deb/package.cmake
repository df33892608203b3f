# The Debian package (MG_PACKAGE=ON, built by scripts/build-deb.sh with the prefix /usr):
# `cpack -G DEB` in the build tree writes moongate_VERSION_ARCH.deb.
#
# On top of `cmake --install`'s files it holds /etc/moongate (a commented policy and the
# environment file, both conffiles), and maintainer scripts that create the moongate system
# user and enable the unit without starting it (it starts at the next boot, or with
# `systemctl start moongate` once /etc/moongate/moongate.env says where to route).

install(FILES ${CMAKE_SOURCE_DIR}/examples/systemd/policy.lua
        DESTINATION ${CMAKE_INSTALL_FULL_SYSCONFDIR}/moongate
        PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
# Tokens go in it: readable by root and (postinst) the moongate group only.
install(FILES ${CMAKE_SOURCE_DIR}/examples/systemd/moongate.env
        DESTINATION ${CMAKE_INSTALL_FULL_SYSCONFDIR}/moongate
        PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ)

set(MG_DEB_CONTROL ${CMAKE_BINARY_DIR}/deb-control)
file(MAKE_DIRECTORY ${MG_DEB_CONTROL})
file(WRITE ${MG_DEB_CONTROL}/conffiles
     "${CMAKE_INSTALL_FULL_SYSCONFDIR}/moongate/policy.lua\n"
     "${CMAKE_INSTALL_FULL_SYSCONFDIR}/moongate/moongate.env\n")
foreach(script postinst prerm postrm)
  file(COPY ${CMAKE_SOURCE_DIR}/scripts/deb/${script} DESTINATION ${MG_DEB_CONTROL}
       FILE_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE
                        WORLD_READ WORLD_EXECUTE)
endforeach()

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME moongate)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "moongate maintainers <moongate@localhost>")
string(CONCAT CPACK_DEBIAN_PACKAGE_DESCRIPTION
    "gateway to users' LLM servers over SSH, with its policy in Lua\n"
    "moongate lets a cloud web app reach each user's own LLM server (Ollama, llama.cpp,\n"
    "vLLM) behind NAT: it keeps a pool of SSH connections per user, dialled directly or\n"
    "carried in the WebSocket of the user's moongate-agent, and streams HTTP requests over\n"
    "SSH channels. Authentication, limits and routing are a Lua policy, reloaded without\n"
    "dropping a request.")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# The shared libraries' packages come from dpkg-shlibdeps; the scripts need adduser.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "openssh-server, redis-server")
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${MG_DEB_CONTROL}/conffiles ${MG_DEB_CONTROL}/postinst ${MG_DEB_CONTROL}/prerm
    ${MG_DEB_CONTROL}/postrm)
set(CPACK_PACKAGING_INSTALL_PREFIX ${CMAKE_INSTALL_PREFIX})
include(CPack)
