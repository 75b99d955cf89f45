; LayerDesk's Windows installer, built around the PyInstaller one-folder build by installer/build.sh:
;
;   makensis -DVERSION=0.1.0 -DAPPDIR=<dist>\LayerDesk -DOUTFILE=<file>.exe [-DTOOLSDIR=<folder>] layerdesk.nsi
;
; APPDIR  the one-folder build (layerdesk.exe, layerctl.exe, _internal\)
; TOOLSDIR optional: the engine's Windows tools to ship (qemu-img.exe and its DLLs, libwim-15.dll);
;          installed into <install folder>\tools, where LayerDesk looks first.
;
; Per-user (no administrator rights; %LOCALAPPDATA%\Programs\LayerDesk) or per-machine (Program Files)
; install. The catalog and layer repository live in the user's data folder (%LOCALAPPDATA%\LayerDesk),
; never in the install folder: an upgrade replaces the program only, and the uninstaller leaves them.

Unicode true
; Releases use solid LZMA (smallest); a build check may pass -DCOMPRESSOR=zlib, which is many times faster,
; or -DCOMPRESSOR=none, which stores the files as they are (the fastest: what a check of the contents needs).
!ifdef COMPRESSOR
  !if "${COMPRESSOR}" == "none"
    SetCompress off
  !else
    SetCompressor ${COMPRESSOR}
  !endif
!else
  SetCompressor /SOLID lzma
!endif

!ifndef VERSION
  !error "Pass -DVERSION=x.y.z (installer/build.sh reads it from pyproject.toml)"
!endif
!ifndef APPDIR
  !error "Pass -DAPPDIR=<the PyInstaller one-folder build>"
!endif
!ifndef OUTFILE
  !define OUTFILE "LayerDesk-${VERSION}-setup.exe"
!endif

!define PRODUCT "LayerDesk"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\LayerDesk"
!define SETTINGS_KEY "Software\LayerDesk"

; --- per-user or per-machine -----------------------------------------------------------------------
!define MULTIUSER_EXECUTIONLEVEL Highest
!define MULTIUSER_MUI
!define MULTIUSER_INSTALLMODE_COMMANDLINE          ; /AllUsers or /CurrentUser for silent installs
!define MULTIUSER_USE_PROGRAMFILES64
!define MULTIUSER_INSTALLMODE_INSTDIR "LayerDesk"
!define MULTIUSER_INSTALLMODE_INSTDIR_REGISTRY_KEY "${SETTINGS_KEY}"
!define MULTIUSER_INSTALLMODE_INSTDIR_REGISTRY_VALUENAME "InstallFolder"
!define MULTIUSER_INSTALLMODE_DEFAULT_REGISTRY_KEY "${SETTINGS_KEY}"
!define MULTIUSER_INSTALLMODE_DEFAULT_REGISTRY_VALUENAME "InstallMode"
!include MultiUser.nsh
!include MUI2.nsh
!include LogicLib.nsh
!include FileFunc.nsh
!include x64.nsh

Name "${PRODUCT} ${VERSION}"
OutFile "${OUTFILE}"
BrandingText "${PRODUCT} ${VERSION}"
ShowInstDetails show
ShowUninstDetails show

VIProductVersion "${VERSION}.0"
VIAddVersionKey /LANG=1033 "ProductName" "${PRODUCT}"
VIAddVersionKey /LANG=1033 "ProductVersion" "${VERSION}"
VIAddVersionKey /LANG=1033 "FileVersion" "${VERSION}"
VIAddVersionKey /LANG=1033 "FileDescription" "${PRODUCT} installer"
VIAddVersionKey /LANG=1033 "CompanyName" "${PRODUCT}"
VIAddVersionKey /LANG=1033 "LegalCopyright" "LayerDesk contributors, GPL-3.0-or-later"

!define MUI_ABORTWARNING
!define MUI_FINISHPAGE_RUN "$INSTDIR\layerdesk.exe"
!define MUI_FINISHPAGE_RUN_TEXT "Start the LayerDesk console"
!define MUI_FINISHPAGE_TEXT "LayerDesk is installed.$\r$\n$\r$\nThe compositing engine needs qemu-img (disk images: VHD, VHDX, VMDK, qcow2, raw) and wimlib (importing and merging layers, WIM images). $\r$\n$\r$\nThe console shows at start-up which of them it found and which operations are unavailable without them (System > About lists each tool). Your catalog and layer repository are kept in your data folder, %LOCALAPPDATA%\LayerDesk."

!insertmacro MUI_PAGE_LICENSE "${APPDIR}\_internal\LICENSE"
!insertmacro MULTIUSER_PAGE_INSTALLMODE
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_DIRECTORY
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH
!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_LANGUAGE "English"

Function .onInit
  ${IfNot} ${RunningX64}
    MessageBox MB_ICONSTOP "LayerDesk needs 64-bit Windows."
    Abort
  ${EndIf}
  !insertmacro MULTIUSER_INIT
FunctionEnd

Function un.onInit
  !insertmacro MULTIUSER_UNINIT
FunctionEnd

; The program files an earlier version installed are removed before the new ones are copied, so no
; stale library survives an upgrade; the data folder is not under $INSTDIR and is never touched.
!macro RemoveProgramFiles
  RMDir /r "$INSTDIR\_internal"
  Delete "$INSTDIR\layerdesk.exe"
  Delete "$INSTDIR\layerctl.exe"
  Delete "$INSTDIR\uninstall.exe"
!macroend

Section "LayerDesk console and command line" SecProgram
  SectionIn RO
  SetOutPath "$INSTDIR"
  !insertmacro RemoveProgramFiles
  File /r "${APPDIR}\*"
  WriteUninstaller "$INSTDIR\uninstall.exe"

  CreateDirectory "$SMPROGRAMS\${PRODUCT}"
  CreateShortcut "$SMPROGRAMS\${PRODUCT}\LayerDesk.lnk" "$INSTDIR\layerdesk.exe"
  CreateShortcut "$SMPROGRAMS\${PRODUCT}\Uninstall LayerDesk.lnk" "$INSTDIR\uninstall.exe" "/$MultiUser.InstallMode"

  WriteRegStr SHCTX "${SETTINGS_KEY}" "InstallFolder" "$INSTDIR"
  WriteRegStr SHCTX "${SETTINGS_KEY}" "InstallMode" "$MultiUser.InstallMode"
  WriteRegStr SHCTX "${SETTINGS_KEY}" "Version" "${VERSION}"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "DisplayName" "${PRODUCT}"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "Publisher" "${PRODUCT}"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "DisplayIcon" "$INSTDIR\layerdesk.exe"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\uninstall.exe" /$MultiUser.InstallMode'
  WriteRegStr SHCTX "${UNINSTALL_KEY}" "QuietUninstallString" '"$INSTDIR\uninstall.exe" /$MultiUser.InstallMode /S'
  WriteRegDWORD SHCTX "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD SHCTX "${UNINSTALL_KEY}" "NoRepair" 1
  ${GetSize} "$INSTDIR" "/S=0K" $0 $1 $2
  WriteRegDWORD SHCTX "${UNINSTALL_KEY}" "EstimatedSize" $0
SectionEnd

!ifdef TOOLSDIR
Section "Engine tools (qemu-img, wimlib)" SecTools
  SetOutPath "$INSTDIR\tools"
  File /r "${TOOLSDIR}\*"
SectionEnd
!else
Section /o "-Engine tools are not part of this installer" SecTools
SectionEnd
!endif

!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecProgram} "The LayerDesk console (layerdesk.exe) and the layerctl command line."
!ifdef TOOLSDIR
  !insertmacro MUI_DESCRIPTION_TEXT ${SecTools} "qemu-img and wimlib for importing and publishing disks and WIM images, in the tools folder LayerDesk looks in first."
!endif
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Section "Uninstall"
  !insertmacro RemoveProgramFiles
  RMDir /r "$INSTDIR\tools"
  RMDir "$INSTDIR"  ; only when empty: anything the user put there stays
  Delete "$SMPROGRAMS\${PRODUCT}\LayerDesk.lnk"
  Delete "$SMPROGRAMS\${PRODUCT}\Uninstall LayerDesk.lnk"
  RMDir "$SMPROGRAMS\${PRODUCT}"
  DeleteRegKey SHCTX "${UNINSTALL_KEY}"
  DeleteRegKey SHCTX "${SETTINGS_KEY}"
  DetailPrint "Your catalog and layer repository stay in %LOCALAPPDATA%\LayerDesk."
SectionEnd
